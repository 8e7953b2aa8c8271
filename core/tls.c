/* tls: see tls.h. */
#define OPENSSL_NO_DEPRECATED 1

#include "tls.h"

#include "crypto.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct wxd_tls {
  SSL *ssl;
  BIO *in;       /* ciphertext from the network; OpenSSL reads it */
  BIO *out;      /* ciphertext OpenSSL wrote; to be sent */
  char err[192]; /* why the last call failed */
};

typedef struct tls_write {
  uv_write_t req;
  void (*cb)(void *arg, int status);
  void *arg;
  char data[];
} tls_write_t;

/* ---- contexts ---- */

/* Hands OpenSSL the passphrase without ever prompting on a terminal (the
 * default callback would, for an encrypted key and no passphrase). */
static int pass_cb(char *buf, int size, int rwflag, void *u) {
  (void)rwflag;
  const char *pass = u;
  if (!pass) return 0;
  size_t n = strlen(pass);
  if (n > (size_t)size) return 0;
  memcpy(buf, pass, n);
  return (int)n;
}

static void set_err(char *err, size_t errlen, const char *what) {
  unsigned long e = ERR_peek_last_error();
  const char *reason = e ? ERR_reason_error_string(e) : NULL;
  if (reason) snprintf(err, errlen, "%s: %s", what, reason);
  else snprintf(err, errlen, "%s", what);
  ERR_clear_error();
}

/* Leaf, key and chain from PEM. Returns 0 or -1 with err set. */
static int load_pem_pair(const wxd_tls_client_conf_t *conf, X509 **leaf, EVP_PKEY **key,
                         STACK_OF(X509) **chain, char *err, size_t errlen) {
  BIO *b = BIO_new_mem_buf(conf->cert_pem, (int)conf->cert_len);
  if (!b) return set_err(err, errlen, "out of memory"), -1;
  *leaf = PEM_read_bio_X509(b, NULL, pass_cb, NULL);
  if (!*leaf) {
    BIO_free(b);
    set_err(err, errlen, "client certificate: not a PEM certificate");
    return -1;
  }
  *chain = sk_X509_new_null();
  X509 *x;
  while (*chain && (x = PEM_read_bio_X509(b, NULL, pass_cb, NULL)) != NULL) {
    if (!sk_X509_push(*chain, x)) {
      X509_free(x);
      break;
    }
  }
  ERR_clear_error(); /* the end of the PEM data */
  BIO_free(b);
  if (!*chain) return set_err(err, errlen, "out of memory"), -1;
  b = BIO_new_mem_buf(conf->key_pem, (int)conf->key_len);
  if (!b) return set_err(err, errlen, "out of memory"), -1;
  *key = PEM_read_bio_PrivateKey(b, NULL, pass_cb, (void *)conf->passphrase);
  BIO_free(b);
  if (!*key) {
    ERR_clear_error();
    snprintf(err, errlen, "client key: not a PEM private key, or a wrong passphrase");
    return -1;
  }
  return 0;
}

/* Leaf, key and chain from a PKCS#12 bundle (wxd_pkcs12_read in rsa.c:
 * WeChat Pay's legacy RC2 bundles included). Returns 0 or -1 with err set. */
static int load_pkcs12(const wxd_tls_client_conf_t *conf, X509 **leaf, EVP_PKEY **key,
                       STACK_OF(X509) **chain, char *err, size_t errlen) {
  int rc = wxd_pkcs12_read(conf->pkcs12, conf->pkcs12_len, conf->passphrase ? conf->passphrase : "", key,
                           leaf, chain);
  if (rc == 0) return 0;
  snprintf(err, errlen, "%s",
           rc == WXD_PKCS12_BAD_PASSPHRASE ? "client certificate: wrong PKCS#12 passphrase"
           : rc == WXD_PKCS12_NOMEM        ? "out of memory"
                                           : "client certificate: invalid PKCS#12 bundle");
  return -1;
}

SSL_CTX *wxd_tls_client_ctx(const wxd_tls_client_conf_t *conf, char *err, size_t errlen) {
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) {
    set_err(err, errlen, "cannot create a TLS context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  /* Pooled connections sit idle most of the time: their buffers go back. */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_verify(ctx, conf->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
  if (conf->verify) {
    if (conf->ca_file) {
      FILE *f = fopen(conf->ca_file, "r");
      if (!f) {
        snprintf(err, errlen, "cannot read ca_file %.200s: %s", conf->ca_file, strerror(errno));
        goto fail;
      }
      fclose(f);
      if (!SSL_CTX_load_verify_file(ctx, conf->ca_file)) {
        ERR_clear_error();
        snprintf(err, errlen, "ca_file %.200s holds no PEM certificate", conf->ca_file);
        goto fail;
      }
    } else if (!SSL_CTX_set_default_verify_paths(ctx)) {
      set_err(err, errlen, "cannot load the system trust store");
      goto fail;
    }
  }
  if (conf->cert_pem || conf->pkcs12) {
    X509 *leaf = NULL;
    EVP_PKEY *key = NULL;
    STACK_OF(X509) *chain = NULL;
    int rc = conf->pkcs12 ? load_pkcs12(conf, &leaf, &key, &chain, err, errlen)
                          : load_pem_pair(conf, &leaf, &key, &chain, err, errlen);
    if (rc == 0 && !SSL_CTX_use_cert_and_key(ctx, leaf, key, chain, 1)) {
      set_err(err, errlen, "client certificate: cannot use it");
      rc = -1;
    }
    if (rc == 0 && !SSL_CTX_check_private_key(ctx)) {
      ERR_clear_error();
      snprintf(err, errlen, "client certificate: the key does not match the certificate");
      rc = -1;
    }
    X509_free(leaf);
    EVP_PKEY_free(key);
    sk_X509_pop_free(chain, X509_free);
    if (rc != 0) goto fail;
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return NULL;
}

/* ---- connections ---- */

wxd_tls_t *wxd_tls_new_client(SSL_CTX *ctx, const char *host) {
  wxd_tls_t *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->ssl = SSL_new(ctx);
  t->in = BIO_new(BIO_s_mem());
  t->out = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->in || !t->out) goto fail;
  /* An empty input BIO means "wait for more", not EOF. */
  BIO_set_mem_eof_return(t->in, -1);
  SSL_set_bio(t->ssl, t->in, t->out); /* SSL owns both from here */
  SSL_set_connect_state(t->ssl);
  unsigned char ip[16];
  int is_ip = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;
  if (!is_ip && !SSL_set_tlsext_host_name(t->ssl, host)) goto fail_ssl;
  if (SSL_get_verify_mode(t->ssl) & SSL_VERIFY_PEER) {
    if (is_ip) {
      if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host)) goto fail_ssl;
    } else {
      SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      if (!SSL_set1_host(t->ssl, host)) goto fail_ssl;
    }
  }
  return t;
fail:
  BIO_free(t->in);
  BIO_free(t->out);
  SSL_free(t->ssl);
  free(t);
  ERR_clear_error();
  return NULL;
fail_ssl:
  wxd_tls_free(t);
  ERR_clear_error();
  return NULL;
}

void wxd_tls_free(wxd_tls_t *t) {
  if (!t) return;
  SSL_free(t->ssl); /* and both BIOs */
  free(t);
}

int wxd_tls_feed(wxd_tls_t *t, const void *data, size_t len) {
  return BIO_write(t->in, data, (int)len) == (int)len ? 0 : -1;
}

void wxd_tls_feed_eof(wxd_tls_t *t) { BIO_set_mem_eof_return(t->in, 0); }

/* Turns a failed SSL call into one of the results, recording why. */
static int result(wxd_tls_t *t, int ret) {
  int e = SSL_get_error(t->ssl, ret);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    ERR_clear_error();
    return WXD_TLS_AGAIN;
  }
  if (e == SSL_ERROR_ZERO_RETURN) {
    ERR_clear_error();
    return WXD_TLS_CLOSED;
  }
  long vr = SSL_get_verify_result(t->ssl);
  unsigned long ec = ERR_peek_last_error();
  const char *reason = ec ? ERR_reason_error_string(ec) : NULL;
  if (!SSL_is_init_finished(t->ssl) && (SSL_get_verify_mode(t->ssl) & SSL_VERIFY_PEER) && vr != X509_V_OK)
    snprintf(t->err, sizeof t->err, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
  else if (reason)
    snprintf(t->err, sizeof t->err, "%s", reason);
  else if (e == SSL_ERROR_SYSCALL)
    snprintf(t->err, sizeof t->err, "connection closed during TLS");
  else
    snprintf(t->err, sizeof t->err, "TLS error");
  ERR_clear_error();
  return WXD_TLS_ERROR;
}

int wxd_tls_handshake(wxd_tls_t *t) {
  ERR_clear_error();
  int ret = SSL_do_handshake(t->ssl);
  if (ret == 1) return WXD_TLS_OK;
  int r = result(t, ret);
  return r == WXD_TLS_CLOSED ? WXD_TLS_ERROR : r;
}

int wxd_tls_read(wxd_tls_t *t, void *buf, size_t cap, size_t *n) {
  ERR_clear_error();
  size_t got = 0;
  int ret = SSL_read_ex(t->ssl, buf, cap, &got);
  if (ret == 1) {
    *n = got;
    return WXD_TLS_OK;
  }
  *n = 0;
  return result(t, ret);
}

int wxd_tls_write(wxd_tls_t *t, const void *data, size_t len) {
  ERR_clear_error();
  size_t done = 0;
  /* A memory BIO never pushes back, so one call takes everything. */
  if (len == 0) return WXD_TLS_OK;
  if (SSL_write_ex(t->ssl, data, len, &done) == 1 && done == len) return WXD_TLS_OK;
  result(t, 0);
  return WXD_TLS_ERROR;
}

void wxd_tls_shutdown(wxd_tls_t *t) {
  ERR_clear_error();
  if (SSL_is_init_finished(t->ssl)) SSL_shutdown(t->ssl);
  ERR_clear_error();
}

size_t wxd_tls_pending(const wxd_tls_t *t) { return BIO_ctrl_pending(t->out); }

size_t wxd_tls_take(wxd_tls_t *t, void *buf, size_t cap) {
  int n = BIO_read(t->out, buf, (int)(cap > 1 << 30 ? 1 << 30 : cap));
  return n > 0 ? (size_t)n : 0;
}

static void on_flushed(uv_write_t *req, int status) {
  tls_write_t *w = (tls_write_t *)req;
  void (*cb)(void *, int) = w->cb;
  void *arg = w->arg;
  free(w);
  if (cb) cb(arg, status);
}

int wxd_tls_flush(wxd_tls_t *t, uv_stream_t *s, void (*cb)(void *arg, int status), void *arg) {
  size_t n = wxd_tls_pending(t);
  if (n == 0) return 0;
  tls_write_t *w = malloc(sizeof *w + n);
  if (!w) return UV_ENOMEM;
  n = wxd_tls_take(t, w->data, n);
  w->cb = cb;
  w->arg = arg;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
  int rc = uv_write(&w->req, s, &b, 1, on_flushed);
  if (rc != 0) {
    free(w);
    return rc;
  }
  return 1;
}

const char *wxd_tls_error(const wxd_tls_t *t) { return t->err[0] ? t->err : "TLS error"; }
