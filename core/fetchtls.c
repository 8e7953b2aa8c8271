/* fetch: the pool's TLS client contexts, one per distinct set of TLS
 * settings (keyed by their SHA-256), shared by the hosts that use them. */
#include "fetch_internal.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- TLS contexts ---- */

/* Frees unused contexts while there are more than `keep`. */
void wxd__fetch_ctx_trim(wxd_fetch_pool_t *p, unsigned keep) {
  fetch_ctx_t **pp = &p->ctxs;
  while (*pp && p->nctxs > keep) {
    fetch_ctx_t *c = *pp;
    if (c->refs == 0) {
      *pp = c->next;
      SSL_CTX_free(c->ctx);
      free(c);
      p->nctxs--;
    } else {
      pp = &c->next;
    }
  }
}

/* The cached context for these settings, made on first use. NULL with err
 * set when the settings are unusable (a CA file that cannot be read, a bad
 * client certificate). */
fetch_ctx_t *wxd__fetch_ctx_get(wxd_fetch_pool_t *p, const unsigned char id[32], const wxd_tls_client_conf_t *conf,
                            char *err, size_t errlen) {
  for (fetch_ctx_t *c = p->ctxs; c; c = c->next)
    if (memcmp(c->id, id, 32) == 0) return c;
  SSL_CTX *ctx = wxd_tls_client_ctx(conf, err, errlen);
  if (!ctx) return NULL;
  wxd__fetch_ctx_trim(p, CTX_MAX - 1);
  fetch_ctx_t *c = calloc(1, sizeof *c);
  if (!c) {
    SSL_CTX_free(ctx);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  memcpy(c->id, id, 32);
  c->ctx = ctx;
  c->next = p->ctxs;
  p->ctxs = c;
  p->nctxs++;
  return c;
}

/* SHA-256 over the TLS settings, each with its length, so that two
 * different settings never share a context or a connection. */
int wxd__fetch_settings_id(const wxd_tls_client_conf_t *c, unsigned char id[32]) {
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  if (!md) return -1;
  int ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL);
  const char *parts[] = {c->verify ? "v1" : "v0", c->ca_file, c->cert_pem, c->key_pem, c->pkcs12, c->passphrase};
  size_t lens[] = {2, c->ca_file ? strlen(c->ca_file) : 0, c->cert_len, c->key_len, c->pkcs12_len,
                   c->passphrase ? strlen(c->passphrase) : 0};
  for (int i = 0; ok && i < 6; i++) {
    uint64_t n = parts[i] ? (uint64_t)lens[i] + 1 : 0; /* absent differs from empty */
    ok = EVP_DigestUpdate(md, &n, sizeof n) && (!parts[i] || EVP_DigestUpdate(md, parts[i], lens[i]));
  }
  unsigned int len = 0;
  ok = ok && EVP_DigestFinal_ex(md, id, &len);
  EVP_MD_CTX_free(md);
  return ok ? 0 : -1;
}
