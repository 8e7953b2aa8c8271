/* httpscan: the byte-level checks llhttp 8.1 lacks, shared by the server
 * (requests, http.c) and the client (responses, fetch.c).
 *
 * Run on raw bytes before llhttp sees them: the start line and header lines
 * must end in CRLF; no obs-fold; no whitespace in or before a field name; no
 * empty field name; chunk-size lines are hex digits (at most 15), optionally
 * with extensions, then CRLF; chunk data is followed by exactly CRLF;
 * trailers follow the header rules. It also bounds bytes that reach no
 * llhttp callback: the raw head, the trailers, each chunk-size line; and a
 * chunked body by the sizes its lines announce, so that a size over the
 * limit is refused when its line is read, not once its data has come.
 *
 * A scanner checks one part at a time: a head (until its blank line), or a
 * chunked body (until the blank line after the trailers). *upto tells the
 * caller how many bytes belong to the part, so that it hands llhttp no byte
 * of the next message before the scanner has seen it.
 */
#ifndef WXD_HTTPSCAN_H
#define WXD_HTTPSCAN_H

#include <stddef.h>
#include <stdint.h>

enum { WXD_SCAN_OFF = 0, WXD_SCAN_HEAD, WXD_SCAN_CHUNKED };

/* Results of wxd_scan. */
enum {
  WXD_SCAN_OK = 0,
  WXD_SCAN_MALFORMED,       /* a refused shape */
  WXD_SCAN_HEAD_TOO_LARGE,  /* the head or the trailers exceed the bound */
  WXD_SCAN_CHUNK_LINE_LONG, /* a chunk-size line (with extensions) over 4 KiB */
  WXD_SCAN_BODY_TOO_LARGE,  /* the chunk sizes add up to more than max_body */
};

#define WXD_SCAN_CHUNK_LINE_MAX 4096

typedef struct wxd_scan {
  int mode;           /* WXD_SCAN_OFF, _HEAD, _CHUNKED */
  int is_request;     /* head: empty lines may precede a request line */
  int cs;             /* chunked-body state (httpscan.c) */
  int line;           /* head: 0 is the start line */
  size_t line_len;    /* bytes on this line, CR excluded */
  int in_name;        /* before the colon of a field line */
  int saw_cr;
  size_t bytes;       /* raw bytes of this head or trailer part */
  uint64_t remaining; /* chunk data still to come */
  int ndigits;
  size_t chunk_line;  /* bytes of the current chunk-size line */
  uint64_t max_body;  /* chunked: bound on the sum of the chunk sizes */
  uint64_t announced; /* chunked: sum of the sizes of the chunks before this one */
} wxd_scan_t;

/* Starts checking a head: a request's (is_request) or a response's. */
void wxd_scan_head(wxd_scan_t *s, int is_request);
/* Starts checking a chunked body, once its head was accepted; the chunk
 * sizes may add up to max_body bytes at most. */
void wxd_scan_chunked(wxd_scan_t *s, uint64_t max_body);
/* Scans data[0..len) of the current part; max_head bounds the raw bytes of
 * a head and of the trailers. Returns WXD_SCAN_OK with *upto set (all of
 * len, or up to the end of the part, after which the scanner is off), or
 * one of the refusals above. */
int wxd_scan(wxd_scan_t *s, const char *data, size_t len, size_t max_head, size_t *upto);

#endif
