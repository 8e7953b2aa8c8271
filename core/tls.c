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

/* The first certificate of a PEM buffer and the ones after it (its
 * chain). Returns 0, or -1 when there is no certificate (or no memory). */
static int parse_pem_chain(const char *pem, size_t len, X509 **leaf, STACK_OF(X509) **chain) {
  *leaf = NULL;
  *chain = NULL;
  BIO *b = BIO_new_mem_buf(pem, (int)len);
  if (!b) return -1;
  *leaf = PEM_read_bio_X509(b, NULL, pass_cb, NULL);
  if (*leaf) *chain = sk_X509_new_null();
  X509 *x;
  while (*chain && (x = PEM_read_bio_X509(b, NULL, pass_cb, NULL)) != NULL) {
    if (!sk_X509_push(*chain, x)) {
      X509_free(x);
      break;
    }
  }
  ERR_clear_error(); /* the end of the PEM data */
  BIO_free(b);
  if (*leaf && *chain) return 0;
  X509_free(*leaf);
  *leaf = NULL;
  return -1;
}

/* A PEM private key, maybe encrypted; NULL when unreadable. */
static EVP_PKEY *parse_pem_key(const char *pem, size_t len, const char *passphrase) {
  BIO *b = BIO_new_mem_buf(pem, (int)len);
  if (!b) return NULL;
  EVP_PKEY *key = PEM_read_bio_PrivateKey(b, NULL, pass_cb, (void *)passphrase);
  BIO_free(b);
  ERR_clear_error();
  return key;
}

/* Leaf, key and chain from PEM. Returns 0 or -1 with err set. */
static int load_pem_pair(const wxd_tls_client_conf_t *conf, X509 **leaf, EVP_PKEY **key,
                         STACK_OF(X509) **chain, char *err, size_t errlen) {
  if (parse_pem_chain(conf->cert_pem, conf->cert_len, leaf, chain) != 0) {
    snprintf(err, errlen, "client certificate: not a PEM certificate");
    return -1;
  }
  *key = parse_pem_key(conf->key_pem, conf->key_len, conf->passphrase);
  if (!*key) {
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

/* A PEM file of at most 1 MiB, read whole (NUL-terminated). Returns the
 * bytes (free() them), or NULL with err naming the file. */
static char *read_pem_file(const char *what, const char *path, size_t *len, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "cannot read %s %.300s: %s", what, path, strerror(errno));
    return NULL;
  }
  size_t cap = 1 << 20, n = 0;
  char *buf = malloc(cap + 1);
  if (buf) n = fread(buf, 1, cap + 1, f);
  int bad = buf && (ferror(f) || n > cap);
  int e = errno;
  fclose(f);
  if (!buf || bad) {
    if (buf) OPENSSL_cleanse(buf, n > cap ? cap : n);
    free(buf);
    if (!buf) snprintf(err, errlen, "out of memory");
    else if (n > cap) snprintf(err, errlen, "%s %.300s: larger than 1 MiB, not a PEM file", what, path);
    else snprintf(err, errlen, "cannot read %s %.300s: %s", what, path, strerror(e));
    return NULL;
  }
  buf[n] = 0;
  *len = n;
  return buf;
}

/* Only http/1.1 is spoken: chosen when the client offers it, otherwise the
 * handshake goes on without ALPN (a client that offers only h2 then fails
 * at its own pace rather than on an alert). */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
  (void)ssl;
  (void)arg;
  static const unsigned char ours[] = "\x08http/1.1";
  unsigned char *sel = NULL;
  if (SSL_select_next_proto(&sel, outlen, ours, sizeof ours - 1, in, inlen) == OPENSSL_NPN_NEGOTIATED) {
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
  }
  return SSL_TLSEXT_ERR_NOACK;
}

/* TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites
 * are all of that already; OpenSSL's default list for them stays. */
#define SERVER_CIPHERS_12                                                                   \
  "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
  "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

SSL_CTX *wxd_tls_server_ctx(const wxd_tls_server_conf_t *conf, char *err, size_t errlen) {
  ERR_clear_error();
  char *cert_pem = NULL, *key_pem = NULL;
  size_t cert_len = 0, key_len = 0;
  X509 *leaf = NULL;
  EVP_PKEY *key = NULL;
  STACK_OF(X509) *chain = NULL;
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    set_err(err, errlen, "cannot create a TLS context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, conf->min_version ? conf->min_version : TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  /* Idle keep-alive connections give their record buffers back. */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  if (!SSL_CTX_set_cipher_list(ctx, SERVER_CIPHERS_12)) {
    set_err(err, errlen, "cannot set the TLS 1.2 cipher list");
    goto fail;
  }
  /* Sessions (tickets and the cache) belong to this context: resumption
   * needs an id context once client certificates are checked. */
  SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"wxd", 3);
  SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);

  cert_pem = read_pem_file("certificate file", conf->cert_file, &cert_len, err, errlen);
  if (!cert_pem) goto fail;
  if (parse_pem_chain(cert_pem, cert_len, &leaf, &chain) != 0) {
    snprintf(err, errlen, "certificate file %.300s holds no PEM certificate", conf->cert_file);
    goto fail;
  }
  key_pem = read_pem_file("key file", conf->key_file, &key_len, err, errlen);
  if (!key_pem) goto fail;
  key = parse_pem_key(key_pem, key_len, conf->passphrase);
  if (!key) {
    int encrypted = strstr(key_pem, "ENCRYPTED") != NULL;
    if (encrypted && !conf->passphrase)
      snprintf(err, errlen, "key file %.300s is encrypted and no passphrase was given", conf->key_file);
    else if (encrypted)
      snprintf(err, errlen, "key file %.300s: wrong passphrase", conf->key_file);
    else
      snprintf(err, errlen, "key file %.300s holds no PEM private key", conf->key_file);
    goto fail;
  }
  if (!X509_check_private_key(leaf, key)) {
    ERR_clear_error();
    snprintf(err, errlen, "the key in %.300s does not match the certificate in %.300s", conf->key_file,
             conf->cert_file);
    goto fail;
  }
  if (!SSL_CTX_use_cert_and_key(ctx, leaf, key, chain, 1)) {
    set_err(err, errlen, "cannot use the certificate and key");
    goto fail;
  }
  if (conf->client_verify != WXD_TLS_VERIFY_OFF) {
    if (!conf->client_ca) {
      snprintf(err, errlen, "client certificates are verified but no client CA file is given");
      goto fail;
    }
    FILE *f = fopen(conf->client_ca, "r");
    if (!f) {
      snprintf(err, errlen, "cannot read client CA file %.300s: %s", conf->client_ca, strerror(errno));
      goto fail;
    }
    fclose(f);
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(conf->client_ca);
    if (!names || !SSL_CTX_load_verify_file(ctx, conf->client_ca)) {
      sk_X509_NAME_pop_free(names, X509_NAME_free);
      ERR_clear_error();
      snprintf(err, errlen, "client CA file %.300s holds no PEM certificate", conf->client_ca);
      goto fail;
    }
    /* Tells clients which CAs we accept (they pick their certificate). */
    SSL_CTX_set_client_CA_list(ctx, names);
    int mode = SSL_VERIFY_PEER;
    if (conf->client_verify == WXD_TLS_VERIFY_REQUIRE) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    SSL_CTX_set_verify(ctx, mode, NULL);
  }
  X509_free(leaf);
  EVP_PKEY_free(key);
  sk_X509_pop_free(chain, X509_free);
  free(cert_pem);
  OPENSSL_cleanse(key_pem, key_len);
  free(key_pem);
  ERR_clear_error();
  return ctx;
fail:
  X509_free(leaf);
  EVP_PKEY_free(key);
  sk_X509_pop_free(chain, X509_free);
  free(cert_pem);
  if (key_pem) OPENSSL_cleanse(key_pem, key_len);
  free(key_pem);
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return NULL;
}

/* ---- connections ---- */

/* A connection with its two memory BIOs, or NULL. */
static wxd_tls_t *tls_new(SSL_CTX *ctx) {
  wxd_tls_t *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->ssl = SSL_new(ctx);
  t->in = BIO_new(BIO_s_mem());
  t->out = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->in || !t->out) {
    BIO_free(t->in);
    BIO_free(t->out);
    SSL_free(t->ssl);
    free(t);
    ERR_clear_error();
    return NULL;
  }
  /* An empty input BIO means "wait for more", not EOF. */
  BIO_set_mem_eof_return(t->in, -1);
  SSL_set_bio(t->ssl, t->in, t->out); /* SSL owns both from here */
  return t;
}

wxd_tls_t *wxd_tls_new_client(SSL_CTX *ctx, const char *host) {
  wxd_tls_t *t = tls_new(ctx);
  if (!t) return NULL;
  SSL_set_connect_state(t->ssl);
  unsigned char ip[16];
  int is_ip = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;
  if (!is_ip && !SSL_set_tlsext_host_name(t->ssl, host)) goto fail;
  if (SSL_get_verify_mode(t->ssl) & SSL_VERIFY_PEER) {
    if (is_ip) {
      if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host)) goto fail;
    } else {
      SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      if (!SSL_set1_host(t->ssl, host)) goto fail;
    }
  }
  return t;
fail:
  wxd_tls_free(t);
  ERR_clear_error();
  return NULL;
}

wxd_tls_t *wxd_tls_new_server(SSL_CTX *ctx) {
  wxd_tls_t *t = tls_new(ctx);
  if (t) SSL_set_accept_state(t->ssl);
  return t;
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

/* A memory BIO keeps the largest buffer it ever needed: an empty one that
 * grew past a record's worth is swapped for a fresh one. */
static BIO *fresh_if_big(BIO *b) {
  BUF_MEM *bm = NULL;
  if (BIO_ctrl_pending(b) != 0 || BIO_get_mem_ptr(b, &bm) <= 0 || !bm || bm->max <= 2 * 16384) return NULL;
  return BIO_new(BIO_s_mem());
}

void wxd_tls_trim(wxd_tls_t *t) {
  BIO *in = fresh_if_big(t->in), *out = fresh_if_big(t->out);
  if (in) {
    BIO_set_mem_eof_return(in, -1);
    SSL_set0_rbio(t->ssl, in); /* frees the old one */
    t->in = in;
  }
  if (out) {
    SSL_set0_wbio(t->ssl, out);
    t->out = out;
  }
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


/* ---- what was negotiated ---- */

/* An RFC 2253 name as a malloc'd string (UTF-8 left unescaped), or NULL. */
static char *name_string(const X509_NAME *name) {
  BIO *b = BIO_new(BIO_s_mem());
  if (!b) return NULL;
  char *s = NULL;
  if (X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) >= 0) {
    char *p;
    long n = BIO_get_mem_data(b, &p);
    s = malloc((size_t)n + 1);
    if (s) {
      memcpy(s, p, (size_t)n);
      s[n] = 0;
    }
  }
  BIO_free(b);
  return s;
}

static char *serial_string(X509 *x) {
  BIGNUM *bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
  char *hex = bn ? BN_bn2hex(bn) : NULL;
  BN_free(bn);
  char *s = hex ? strdup(hex) : NULL;
  OPENSSL_free(hex);
  return s;
}

wxd_tls_info_t *wxd_tls_info_new(wxd_tls_t *t) {
  SSL *ssl = t->ssl;
  const char *parts[6] = {SSL_get_version(ssl), SSL_get_cipher_name(ssl),
                          SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name), NULL, NULL, NULL};
  char *owned[3] = {NULL, NULL, NULL};
  X509 *peer = SSL_get0_peer_certificate(ssl);
  if (peer) {
    owned[0] = name_string(X509_get_subject_name(peer));
    owned[1] = name_string(X509_get_issuer_name(peer));
    owned[2] = serial_string(peer);
    for (int i = 0; i < 3; i++) parts[3 + i] = owned[i];
  }
  size_t need = sizeof(wxd_tls_info_t);
  for (int i = 0; i < 6; i++)
    if (parts[i]) need += strlen(parts[i]) + 1;
  wxd_tls_info_t *info = calloc(1, need);
  if (info) {
    char *p = (char *)(info + 1);
    const char **fields[6] = {&info->version, &info->cipher, &info->server_name,
                              &info->client_subject, &info->client_issuer, &info->client_serial};
    for (int i = 0; i < 6; i++) {
      if (!parts[i]) continue;
      size_t n = strlen(parts[i]) + 1;
      memcpy(p, parts[i], n);
      *fields[i] = p;
      p += n;
    }
    /* A certificate that failed verification ends the handshake, so one
     * that is here was verified, unless verification is off. */
    info->client_verified =
        peer && (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER) && SSL_get_verify_result(ssl) == X509_V_OK;
  }
  for (int i = 0; i < 3; i++) free(owned[i]);
  ERR_clear_error();
  return info;
}
