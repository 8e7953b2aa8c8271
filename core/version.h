/* version: the one place the release number lives. */
#ifndef WXD_VERSION_H
#define WXD_VERSION_H
#define WXD_VERSION "0.1.0"
#endif
