/* tls: TLS on OpenSSL 3 as a memory-BIO pump, for any libuv stream.
 *
 * OpenSSL never touches a socket here. The owner of a connection feeds the
 * ciphertext it reads into wxd_tls_feed(), drives the handshake and reads
 * plaintext with wxd_tls_handshake() / wxd_tls_read(), hands plaintext to
 * wxd_tls_write(), and after each of these calls sends whatever ciphertext
 * OpenSSL produced: with wxd_tls_flush() (a uv_write of a copy), or by taking
 * it with wxd_tls_take() into its own write path. So the same layer serves
 * the outbound client (fetch.c) and the HTTPS listeners (http.c, httpout.c),
 * and a connection's TLS state can outlive its libuv handle: a pooled
 * keep-alive connection keeps its wxd_tls_t while it holds no handle.
 *
 * Contexts: wxd_tls_client_ctx() makes an SSL_CTX for clients: TLS 1.2 at
 * least, peer verification and host name checks on unless conf->verify is
 * 0, the system trust store or conf->ca_file, and an optional client
 * certificate from a PEM pair or a PKCS#12 bundle. wxd_tls_server_ctx()
 * makes one for HTTPS listeners from files: TLS 1.2 at least, ECDHE with
 * AEAD ciphers only for 1.2, server cipher preference, no compression, no
 * renegotiation, session tickets, ALPN http/1.1, optional client
 * certificates checked against a CA file. The caller owns the returned
 * SSL_CTX (SSL_CTX_free); every wxd_tls_t made from it holds its own
 * reference, so a context replaced by a reload lives on in the connections
 * that use it.
 *
 * Errors are short sentences without secrets: no key, passphrase or
 * plaintext is ever copied into one.
 */
#ifndef WXD_TLS_H
#define WXD_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <uv.h>

typedef struct wxd_tls wxd_tls_t;

/* Results of the pump functions. */
enum { WXD_TLS_OK = 0, WXD_TLS_AGAIN = 1, WXD_TLS_CLOSED = 2, WXD_TLS_ERROR = -1 };

typedef struct wxd_tls_client_conf {
  int verify;             /* 1: verify the peer's chain and name (default) */
  const char *ca_file;    /* PEM bundle of trusted CAs; NULL: the system store */
  const char *cert_pem;   /* client certificate (leaf first, then its chain) */
  size_t cert_len;
  const char *key_pem;    /* its private key, PEM, maybe encrypted */
  size_t key_len;
  const char *pkcs12;     /* or a PKCS#12 bundle (DER) */
  size_t pkcs12_len;
  const char *passphrase; /* of the encrypted key or of the bundle; NULL: none */
} wxd_tls_client_conf_t;

/* A client context, or NULL with err set. */
SSL_CTX *wxd_tls_client_ctx(const wxd_tls_client_conf_t *conf, char *err, size_t errlen);

enum { WXD_TLS_VERIFY_OFF = 0, WXD_TLS_VERIFY_OPTIONAL, WXD_TLS_VERIFY_REQUIRE };

typedef struct wxd_tls_server_conf {
  const char *cert_file;  /* PEM: the leaf first, then its chain */
  const char *key_file;   /* PEM private key, maybe encrypted */
  const char *passphrase; /* of the key; NULL: none */
  const char *client_ca;  /* PEM bundle the client certificates must chain to */
  int client_verify;      /* WXD_TLS_VERIFY_* */
  int min_version;        /* TLS1_2_VERSION or TLS1_3_VERSION */
} wxd_tls_server_conf_t;

/* A server context, or NULL with err set: it names the file at fault and
 * never quotes key material or the passphrase. */
SSL_CTX *wxd_tls_server_ctx(const wxd_tls_server_conf_t *conf, char *err, size_t errlen);

/* A connection in client mode for `host` (used for SNI and, when the
 * context verifies, for the name check; an IP literal is checked against
 * the certificate's IP addresses), or NULL when out of memory. */
wxd_tls_t *wxd_tls_new_client(SSL_CTX *ctx, const char *host);
/* A connection in server mode, or NULL when out of memory. */
wxd_tls_t *wxd_tls_new_server(SSL_CTX *ctx);
void wxd_tls_free(wxd_tls_t *t);

/* Ciphertext read from the network. Returns 0, or -1 when out of memory. */
int wxd_tls_feed(wxd_tls_t *t, const void *data, size_t len);
/* The network reached EOF: reads end once the fed bytes are consumed. */
void wxd_tls_feed_eof(wxd_tls_t *t);

/* Advances the handshake: WXD_TLS_OK once done, WXD_TLS_AGAIN while it
 * needs more input, WXD_TLS_ERROR. Flush after each call. */
int wxd_tls_handshake(wxd_tls_t *t);
/* Decrypts into buf: WXD_TLS_OK with *n > 0, WXD_TLS_AGAIN (needs input),
 * WXD_TLS_CLOSED (the peer's close_notify), WXD_TLS_ERROR (which includes
 * an EOF of the network without close_notify: a truncation). */
int wxd_tls_read(wxd_tls_t *t, void *buf, size_t cap, size_t *n);
/* Encrypts all of data. Returns WXD_TLS_OK or WXD_TLS_ERROR. */
int wxd_tls_write(wxd_tls_t *t, const void *data, size_t len);
/* Queues a close_notify alert (flush it, or take it with wxd_tls_take). */
void wxd_tls_shutdown(wxd_tls_t *t);

/* Gives back the memory of buffers that are empty (call when the
 * connection goes idle; not after wxd_tls_feed_eof). */
void wxd_tls_trim(wxd_tls_t *t);

/* Ciphertext waiting to be sent. */
size_t wxd_tls_pending(const wxd_tls_t *t);
/* Moves up to cap bytes of it into buf; returns how many. */
size_t wxd_tls_take(wxd_tls_t *t, void *buf, size_t cap);
/* Sends the pending ciphertext on s (a uv_write of a copy). Returns 1 when
 * a write was started (cb(arg, status) runs once when it completes, also
 * with UV_ECANCELED when s is closed first), 0 when nothing was pending, or
 * a negative libuv error (cb does not run). */
int wxd_tls_flush(wxd_tls_t *t, uv_stream_t *s, void (*cb)(void *arg, int status), void *arg);

/* Why the last call failed, as a short sentence (the certificate check's
 * verdict when that was the cause). */
const char *wxd_tls_error(const wxd_tls_t *t);

/* What a server connection negotiated, once the handshake is done: one
 * allocation (free() it). Strings are NUL-terminated; the client_* ones
 * are NULL without a client certificate. Names are RFC 2253 strings
 * ("CN=client,O=Shop", most specific first, UTF-8 kept as is). */
typedef struct wxd_tls_info {
  const char *version;     /* "TLSv1.3" */
  const char *cipher;      /* OpenSSL's name, e.g. "TLS_AES_256_GCM_SHA384" */
  const char *server_name; /* SNI, or NULL */
  const char *client_subject;
  const char *client_issuer;
  const char *client_serial; /* upper-case hex, as `openssl x509 -serial` */
  int client_verified;     /* a client certificate was presented and verified */
} wxd_tls_info_t;

wxd_tls_info_t *wxd_tls_info_new(wxd_tls_t *t);

#endif
