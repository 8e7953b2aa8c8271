/* rsa: RSA keys, X.509 certificates and PKCS#12 bundles for wxd.core.crypto
 * (see crypto.h and docs/crypto.md).
 *
 * Keys and certificates are userdata in the shape of Lua's liolib: a
 * registry metatable, a checked accessor, a methods table, and one
 * idempotent close bound to __gc. A userdata is created empty before the
 * OpenSSL object is acquired, and OpenSSL objects that must live across a
 * Lua allocation are held by a guard userdata on the stack, so that a Lua
 * error (out of memory) can never leak them.
 */
#define OPENSSL_NO_DEPRECATED 1

#include <lauxlib.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <string.h>
#include <time.h>

#include "crypto.h"

#define KEY_MT "wxd.crypto.key"
#define CERT_MT "wxd.crypto.certificate"
#define GUARD_MT "wxd.crypto.guard"

#define check_bytes wxd__crypto_check_bytes

/* Largest RSA modulus OpenSSL accepts is 16384 bits. */
#define RSA_MAX_BYTES 2048

typedef struct crypto_key {
  EVP_PKEY *pkey;       /* NULL once closed */
  int priv;             /* holds the private half */
  EVP_PKEY_CTX *verify; /* made on the first verify and kept: see key_verify */
  EVP_MD *sha256;       /* the digest of verify */
} crypto_key_t;

typedef struct crypto_cert {
  X509 *x509; /* NULL once closed */
} crypto_cert_t;

/* OpenSSL objects owned by the stack slot of this userdata until moved out. */
typedef struct crypto_guard {
  BIO *bio;
  EVP_PKEY *pkey;
  X509 *x509;
  STACK_OF(X509) *certs;
  X509_STORE *store;
  X509_STORE_CTX *sctx;
  PKCS12 *p12;
  OSSL_PROVIDER *prov[2];
  OSSL_LIB_CTX *libctx; /* freed last: the objects above may belong to it */
} crypto_guard_t;

static int push_fail(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* ---- guard ---- */

static void guard_release(crypto_guard_t *g) {
  BIO_free(g->bio);
  EVP_PKEY_free(g->pkey);
  X509_free(g->x509);
  sk_X509_pop_free(g->certs, X509_free);
  X509_STORE_CTX_free(g->sctx);
  X509_STORE_free(g->store);
  PKCS12_free(g->p12);
  for (int i = 1; i >= 0; i--) {
    if (g->prov[i]) OSSL_PROVIDER_unload(g->prov[i]);
  }
  OSSL_LIB_CTX_free(g->libctx);
  memset(g, 0, sizeof *g);
}

static int guard_gc(lua_State *L) {
  guard_release(luaL_checkudata(L, 1, GUARD_MT));
  return 0;
}

static crypto_guard_t *guard_new(lua_State *L) {
  crypto_guard_t *g = lua_newuserdata(L, sizeof *g);
  memset(g, 0, sizeof *g);
  luaL_getmetatable(L, GUARD_MT);
  lua_setmetatable(L, -2);
  return g;
}

/* ---- key userdata ---- */

#define tokey(L) ((crypto_key_t *)luaL_checkudata(L, 1, KEY_MT))

static crypto_key_t *key_new(lua_State *L) {
  crypto_key_t *k = lua_newuserdata(L, sizeof *k);
  memset(k, 0, sizeof *k);
  luaL_getmetatable(L, KEY_MT);
  lua_setmetatable(L, -2);
  return k;
}

static crypto_key_t *key_check(lua_State *L) {
  crypto_key_t *k = tokey(L);
  if (!k->pkey) luaL_error(L, "attempt to use a closed key");
  return k;
}

static crypto_key_t *key_check_private(lua_State *L, const char *what) {
  crypto_key_t *k = key_check(L);
  if (!k->priv) luaL_error(L, "%s needs a private key", what);
  return k;
}

static void key_drop_verify(crypto_key_t *k) {
  EVP_PKEY_CTX_free(k->verify);
  k->verify = NULL;
  EVP_MD_free(k->sha256);
  k->sha256 = NULL;
}

/* key:close(), __gc: frees the key (OpenSSL clears the private numbers). */
static int key_close(lua_State *L) {
  crypto_key_t *k = tokey(L);
  key_drop_verify(k);
  EVP_PKEY_free(k->pkey);
  k->pkey = NULL;
  return 0;
}

static int key_tostring(lua_State *L) {
  crypto_key_t *k = tokey(L);
  if (!k->pkey) lua_pushliteral(L, "wxd.crypto.key (closed)");
  else
    lua_pushfstring(L, "wxd.crypto.key (RSA-%d %s): %p", EVP_PKEY_get_bits(k->pkey),
                    k->priv ? "private" : "public", (void *)k);
  return 1;
}

/* Only RSA keys are accepted: every operation below is an RSA one, and an
 * EC key would silently sign with ECDSA under a SHA256withRSA name. */
static int pkey_is_rsa(EVP_PKEY *pk) { return pk && EVP_PKEY_is_a(pk, "RSA"); }

/* Decodes a PEM key. selection is EVP_PKEY_KEYPAIR or EVP_PKEY_PUBLIC_KEY.
 * Without a passphrase an encrypted key fails: OpenSSL is given no way to
 * prompt on a terminal. */
static EVP_PKEY *decode_key(const char *pem, size_t len, int selection, const char *pass, size_t plen) {
  EVP_PKEY *pk = NULL;
  OSSL_DECODER_CTX *d = OSSL_DECODER_CTX_new_for_pkey(&pk, "PEM", NULL, "RSA", selection, NULL, NULL);
  if (d && (!pass || OSSL_DECODER_CTX_set_passphrase(d, (const unsigned char *)pass, plen))) {
    const unsigned char *p = (const unsigned char *)pem;
    size_t left = len;
    if (!OSSL_DECODER_from_data(d, &p, &left)) {
      EVP_PKEY_free(pk);
      pk = NULL;
    }
  }
  OSSL_DECODER_CTX_free(d);
  ERR_clear_error();
  if (pk && !pkey_is_rsa(pk)) {
    EVP_PKEY_free(pk);
    pk = NULL;
  }
  return pk;
}

/* load_private_key(pem [, passphrase]) -> key | nil, "invalid key" */
static int crypto_load_private_key(lua_State *L) {
  size_t len, plen = 0;
  const char *pem = check_bytes(L, 1, &len);
  const char *pass = lua_isnoneornil(L, 2) ? NULL : check_bytes(L, 2, &plen);
  crypto_key_t *k = key_new(L);
  k->pkey = decode_key(pem, len, EVP_PKEY_KEYPAIR, pass, plen);
  if (!k->pkey) return push_fail(L, "invalid key");
  k->priv = 1;
  return 1;
}

/* load_public_key(pem) -> key | nil, "invalid key" */
static int crypto_load_public_key(lua_State *L) {
  size_t len;
  const char *pem = check_bytes(L, 1, &len);
  crypto_key_t *k = key_new(L);
  k->pkey = decode_key(pem, len, EVP_PKEY_PUBLIC_KEY, NULL, 0);
  if (!k->pkey) return push_fail(L, "invalid key");
  return 1;
}

/* key:sign(msg) -> signature: SHA256withRSA, PKCS#1 v1.5. */
static int key_sign(lua_State *L) {
  crypto_key_t *k = key_check_private(L, "sign");
  size_t len, siglen = RSA_MAX_BYTES;
  const char *msg = check_bytes(L, 2, &len);
  unsigned char sig[RSA_MAX_BYTES];
  EVP_MD_CTX *m = EVP_MD_CTX_new();
  EVP_PKEY_CTX *pctx = NULL;
  int ok = m && EVP_PKEY_get_size(k->pkey) <= RSA_MAX_BYTES &&
           EVP_DigestSignInit_ex(m, &pctx, "SHA256", NULL, NULL, k->pkey, NULL) &&
           EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) > 0 &&
           EVP_DigestSign(m, sig, &siglen, (const unsigned char *)msg, len);
  EVP_MD_CTX_free(m);
  ERR_clear_error();
  if (!ok) return luaL_error(L, "RSA signing failed");
  lua_pushlstring(L, (const char *)sig, siglen);
  return 1;
}

/* key:verify(msg, signature) -> true | nil, "bad signature" */
static int key_verify(lua_State *L) {
  crypto_key_t *k = key_check(L);
  size_t len, siglen;
  const char *msg = check_bytes(L, 2, &len);
  const char *sig = check_bytes(L, 3, &siglen);
  /* The verification context (PKCS#1 v1.5 over a SHA-256 DigestInfo) is
   * made once per key and reused: setting it up costs about a third of the
   * RSA-2048 verification itself, and a platform certificate's key checks
   * every notification. After a failure it is made anew, so no state of a
   * failed check can carry over. */
  if (!k->verify) {
    k->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    k->verify = k->sha256 ? EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL) : NULL;
    if (!k->verify || EVP_PKEY_verify_init(k->verify) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(k->verify, RSA_PKCS1_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(k->verify, k->sha256) <= 0) {
      key_drop_verify(k);
      ERR_clear_error();
      return luaL_error(L, "RSA verification setup failed");
    }
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  int ok = EVP_Digest(msg, len, md, &mdlen, k->sha256, NULL) &&
           EVP_PKEY_verify(k->verify, (const unsigned char *)sig, siglen, md, mdlen) == 1;
  if (!ok) {
    key_drop_verify(k);
    ERR_clear_error();
    return push_fail(L, "bad signature");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* An OAEP context (SHA-1 for both the label hash and MGF1) for the key. */
static EVP_PKEY_CTX *oaep_ctx(EVP_PKEY *pk, int enc) {
  EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, pk, NULL);
  if (c && (enc ? EVP_PKEY_encrypt_init(c) : EVP_PKEY_decrypt_init(c)) > 0 &&
      EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_OAEP_PADDING) > 0 &&
      EVP_PKEY_CTX_set_rsa_oaep_md_name(c, "SHA1", NULL) > 0 &&
      EVP_PKEY_CTX_set_rsa_mgf1_md_name(c, "SHA1", NULL) > 0)
    return c;
  EVP_PKEY_CTX_free(c);
  return NULL;
}

/* key:encrypt(msg) -> ciphertext | nil, "message too long": RSA-OAEP with
 * SHA-1 and MGF1-SHA-1 (what WeChat Pay uses for sensitive fields). */
static int key_encrypt(lua_State *L) {
  crypto_key_t *k = key_check(L);
  size_t len, outlen = RSA_MAX_BYTES;
  const char *msg = check_bytes(L, 2, &len);
  int size = EVP_PKEY_get_size(k->pkey);
  if (size > RSA_MAX_BYTES) return luaL_error(L, "RSA key too large");
  /* OAEP with SHA-1 leaves k - 2*20 - 2 bytes for the message. */
  if (size < 42 || len > (size_t)size - 42) return push_fail(L, "message too long");
  unsigned char out[RSA_MAX_BYTES];
  EVP_PKEY_CTX *c = oaep_ctx(k->pkey, 1);
  int ok = c && EVP_PKEY_encrypt(c, out, &outlen, (const unsigned char *)msg, len) > 0;
  EVP_PKEY_CTX_free(c);
  ERR_clear_error();
  if (!ok) return luaL_error(L, "RSA encryption failed");
  lua_pushlstring(L, (const char *)out, outlen);
  return 1;
}

/* key:decrypt(ciphertext) -> plaintext | nil, "decrypt failed" */
static int key_decrypt(lua_State *L) {
  crypto_key_t *k = key_check_private(L, "decrypt");
  size_t len, outlen = RSA_MAX_BYTES;
  const char *ct = check_bytes(L, 2, &len);
  if (EVP_PKEY_get_size(k->pkey) > RSA_MAX_BYTES) return luaL_error(L, "RSA key too large");
  /* RFC 8017 7.1.2 step 1: a ciphertext is exactly k octets. OpenSSL
   * would read a shorter one as the same number with leading zeros. */
  if (len != (size_t)EVP_PKEY_get_size(k->pkey)) return push_fail(L, "decrypt failed");
  unsigned char out[RSA_MAX_BYTES];
  EVP_PKEY_CTX *c = oaep_ctx(k->pkey, 0);
  int ok = c && EVP_PKEY_decrypt(c, out, &outlen, (const unsigned char *)ct, len) > 0;
  EVP_PKEY_CTX_free(c);
  ERR_clear_error();
  if (ok) lua_pushlstring(L, (const char *)out, outlen);
  OPENSSL_cleanse(out, sizeof out);
  if (!ok) return push_fail(L, "decrypt failed");
  return 1;
}

static int key_bits(lua_State *L) {
  lua_pushinteger(L, EVP_PKEY_get_bits(key_check(L)->pkey));
  return 1;
}

static int key_is_private(lua_State *L) {
  lua_pushboolean(L, key_check(L)->priv);
  return 1;
}

/* Pushes the contents of a memory BIO held by the guard. */
static void push_bio(lua_State *L, BIO *b) {
  char *data = NULL;
  long n = BIO_get_mem_data(b, &data);
  lua_pushlstring(L, data ? data : "", n > 0 ? (size_t)n : 0);
}

/* key:public_pem() -> "-----BEGIN PUBLIC KEY-----..." (SubjectPublicKeyInfo) */
static int key_public_pem(lua_State *L) {
  crypto_key_t *k = key_check(L);
  crypto_guard_t *g = guard_new(L);
  g->bio = BIO_new(BIO_s_mem());
  if (!g->bio || !PEM_write_bio_PUBKEY(g->bio, k->pkey)) {
    ERR_clear_error();
    return luaL_error(L, "out of memory");
  }
  push_bio(L, g->bio);
  guard_release(g);
  return 1;
}

/* ---- certificate userdata ---- */

#define tocert(L) ((crypto_cert_t *)luaL_checkudata(L, 1, CERT_MT))

static crypto_cert_t *cert_new(lua_State *L) {
  crypto_cert_t *c = lua_newuserdata(L, sizeof *c);
  c->x509 = NULL;
  luaL_getmetatable(L, CERT_MT);
  lua_setmetatable(L, -2);
  return c;
}

static X509 *cert_check(lua_State *L) {
  crypto_cert_t *c = tocert(L);
  if (!c->x509) luaL_error(L, "attempt to use a closed certificate");
  return c->x509;
}

static int cert_close(lua_State *L) {
  crypto_cert_t *c = tocert(L);
  X509_free(c->x509);
  c->x509 = NULL;
  return 0;
}

/* No passphrase prompt, ever (certificates are not encrypted anyway). */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
  (void)buf, (void)size, (void)rwflag, (void)u;
  return -1;
}

/* Reads every certificate of a PEM text into *out (created). Returns the
 * count, or -1 when a block is not a certificate or nothing is found. */
static int read_certs(BIO *bio, STACK_OF(X509) **out) {
  *out = sk_X509_new_null();
  if (!*out) return -1;
  X509 *x;
  while ((x = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL)) != NULL) {
    if (!sk_X509_push(*out, x)) {
      X509_free(x);
      ERR_clear_error();
      return -1;
    }
  }
  unsigned long e = ERR_peek_last_error();
  int clean_end = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
  ERR_clear_error();
  if (!clean_end || sk_X509_num(*out) == 0) return -1;
  return sk_X509_num(*out);
}

/* load_certificate(pem) -> certificate | nil, "invalid certificate": the
 * first certificate of the text. */
static int crypto_load_certificate(lua_State *L) {
  size_t len;
  const char *pem = check_bytes(L, 1, &len);
  crypto_cert_t *c = cert_new(L);
  BIO *bio = BIO_new_mem_buf(pem, (int)len);
  c->x509 = bio ? PEM_read_bio_X509(bio, NULL, no_passphrase, NULL) : NULL;
  BIO_free(bio);
  ERR_clear_error();
  if (!c->x509) return push_fail(L, "invalid certificate");
  return 1;
}

/* Moves the guard's certificate stack into a new array of certificates. */
static void push_cert_list(lua_State *L, crypto_guard_t *g) {
  int n = g->certs ? sk_X509_num(g->certs) : 0;
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    crypto_cert_t *c = cert_new(L);
    c->x509 = sk_X509_value(g->certs, i);
    sk_X509_set(g->certs, i, NULL);
    lua_rawseti(L, -2, i + 1);
  }
}

/* load_certificates(pem) -> { certificate, ... } | nil, "invalid certificate" */
static int crypto_load_certificates(lua_State *L) {
  size_t len;
  const char *pem = check_bytes(L, 1, &len);
  crypto_guard_t *g = guard_new(L);
  g->bio = BIO_new_mem_buf(pem, (int)len);
  if (!g->bio || read_certs(g->bio, &g->certs) < 0) {
    guard_release(g);
    return push_fail(L, "invalid certificate");
  }
  push_cert_list(L, g);
  guard_release(g);
  return 1;
}

/* Upper-case hex of the serial number, as `openssl x509 -serial` and WeChat
 * Pay print it. */
static int cert_serial(lua_State *L) {
  const ASN1_INTEGER *sn = X509_get0_serialNumber(cert_check(L));
  const unsigned char *p = ASN1_STRING_get0_data(sn);
  int n = ASN1_STRING_length(sn);
  char out[2 * 64 + 2];
  size_t o = 0;
  if (ASN1_STRING_type(sn) == V_ASN1_NEG_INTEGER) out[o++] = '-';
  if (n <= 0) {
    out[o++] = '0';
    out[o++] = '0';
  } else {
    if (n > 64) n = 64; /* RFC 5280: at most 20 octets */
    wxd_hex_encode(p, (size_t)n, out + o, 1);
    o += 2 * (size_t)n;
  }
  lua_pushlstring(L, out, o);
  return 1;
}

/* RFC 2253 form ("CN=x,O=y,C=CN"), UTF-8 left unescaped. */
static int push_name(lua_State *L, const X509_NAME *name) {
  crypto_guard_t *g = guard_new(L);
  g->bio = BIO_new(BIO_s_mem());
  if (!g->bio || X509_NAME_print_ex(g->bio, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) < 0) {
    ERR_clear_error();
    return luaL_error(L, "out of memory");
  }
  push_bio(L, g->bio);
  guard_release(g);
  return 1;
}

static int cert_subject(lua_State *L) { return push_name(L, X509_get_subject_name(cert_check(L))); }
static int cert_issuer(lua_State *L) { return push_name(L, X509_get_issuer_name(cert_check(L))); }

static int push_time(lua_State *L, const ASN1_TIME *t) {
  struct tm tm;
  memset(&tm, 0, sizeof tm);
  if (!ASN1_TIME_to_tm(t, &tm)) {
    ERR_clear_error();
    return luaL_error(L, "certificate has an invalid date");
  }
  lua_pushnumber(L, (lua_Number)timegm(&tm));
  return 1;
}

static int cert_not_before(lua_State *L) { return push_time(L, X509_get0_notBefore(cert_check(L))); }
static int cert_not_after(lua_State *L) { return push_time(L, X509_get0_notAfter(cert_check(L))); }

/* Upper-case hex SHA-256 of the DER encoding. */
static int cert_fingerprint(lua_State *L) {
  X509 *x = cert_check(L);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!X509_digest(x, EVP_sha256(), md, &n)) {
    ERR_clear_error();
    return luaL_error(L, "certificate digest failed");
  }
  char out[2 * EVP_MAX_MD_SIZE];
  wxd_hex_encode(md, n, out, 1);
  lua_pushlstring(L, out, 2 * (size_t)n);
  return 1;
}

/* cert:public_key() -> key | nil, "invalid key" (not an RSA key) */
static int cert_public_key(lua_State *L) {
  X509 *x = cert_check(L);
  crypto_key_t *k = key_new(L);
  k->pkey = X509_get_pubkey(x);
  ERR_clear_error();
  if (!pkey_is_rsa(k->pkey)) {
    EVP_PKEY_free(k->pkey);
    k->pkey = NULL;
    return push_fail(L, "invalid key");
  }
  return 1;
}

static int cert_pem(lua_State *L) {
  X509 *x = cert_check(L);
  crypto_guard_t *g = guard_new(L);
  g->bio = BIO_new(BIO_s_mem());
  if (!g->bio || !PEM_write_bio_X509(g->bio, x)) {
    ERR_clear_error();
    return luaL_error(L, "out of memory");
  }
  push_bio(L, g->bio);
  guard_release(g);
  return 1;
}

/* Gathers certificates from a PEM string, a certificate or an array of
 * certificates at idx into *out (created; owned by the caller's guard).
 * Returns 0, or -1 when the value holds no certificate or a bad one. */
static int collect_certs(lua_State *L, int idx, STACK_OF(X509) **out) {
  if (lua_type(L, idx) == LUA_TSTRING) {
    size_t len;
    const char *pem = check_bytes(L, idx, &len);
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    int n = bio ? read_certs(bio, out) : -1;
    BIO_free(bio);
    return n > 0 ? 0 : -1;
  }
  if (!(*out = sk_X509_new_null())) return -1;
  int n = lua_istable(L, idx) ? (int)lua_objlen(L, idx) : 1;
  for (int i = 1; i <= n; i++) {
    if (lua_istable(L, idx)) lua_rawgeti(L, idx, i);
    else lua_pushvalue(L, idx);
    crypto_cert_t *c = luaL_testudata(L, -1, CERT_MT);
    X509 *x = c ? c->x509 : NULL;
    lua_pop(L, 1);
    if (!x || !X509_up_ref(x)) return -1;
    if (!sk_X509_push(*out, x)) {
      X509_free(x);
      return -1;
    }
  }
  return n > 0 ? 0 : -1;
}

/* cert:verify(ca [, opts]) -> true | nil, "invalid ca bundle" |
 * nil, "certificate verify failed", reason.
 * ca is a PEM bundle, a certificate or an array of certificates; the chain
 * must end at one of them. opts.intermediates (same kinds) supplies
 * untrusted intermediates; opts.time (seconds since the epoch) replaces the
 * current time for the validity check. */
static int cert_verify(lua_State *L) {
  X509 *x = cert_check(L);
  int t = lua_type(L, 2);
  if (t != LUA_TSTRING && t != LUA_TTABLE && t != LUA_TUSERDATA)
    luaL_typerror(L, 2, "PEM string, certificate or array of certificates");
  int has_opts = !lua_isnoneornil(L, 3);
  if (has_opts) luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  if (has_opts) {
    lua_getfield(L, 3, "intermediates"); /* 4 */
    lua_getfield(L, 3, "time");          /* 5 */
  } else {
    lua_settop(L, 5);
  }
  int has_time = !lua_isnil(L, 5);
  time_t at = has_time ? (time_t)luaL_checknumber(L, 5) : 0;
  crypto_guard_t *g = guard_new(L);
  if (collect_certs(L, 2, &g->certs) < 0 || !(g->store = X509_STORE_new())) {
    guard_release(g);
    ERR_clear_error();
    return push_fail(L, "invalid ca bundle");
  }
  for (int i = 0; i < sk_X509_num(g->certs); i++) {
    if (!X509_STORE_add_cert(g->store, sk_X509_value(g->certs, i))) {
      guard_release(g);
      ERR_clear_error();
      return push_fail(L, "invalid ca bundle");
    }
  }
  sk_X509_pop_free(g->certs, X509_free); /* the store holds its own references */
  g->certs = NULL;
  if (!lua_isnil(L, 4) && collect_certs(L, 4, &g->certs) < 0) {
    guard_release(g);
    ERR_clear_error();
    return push_fail(L, "invalid certificate");
  }
  g->sctx = X509_STORE_CTX_new();
  if (!g->sctx || !X509_STORE_CTX_init(g->sctx, g->store, x, g->certs)) {
    guard_release(g);
    ERR_clear_error();
    return luaL_error(L, "out of memory");
  }
  if (has_time) X509_VERIFY_PARAM_set_time(X509_STORE_CTX_get0_param(g->sctx), at);
  int ok = X509_verify_cert(g->sctx) == 1;
  /* A static string of OpenSSL's: it outlives the context. */
  const char *reason = ok ? NULL : X509_verify_cert_error_string(X509_STORE_CTX_get_error(g->sctx));
  guard_release(g);
  ERR_clear_error();
  if (!ok) {
    lua_pushnil(L);
    lua_pushliteral(L, "certificate verify failed");
    lua_pushstring(L, reason ? reason : "unknown");
    return 3;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int cert_tostring(lua_State *L) {
  crypto_cert_t *c = tocert(L);
  if (!c->x509) lua_pushliteral(L, "wxd.crypto.certificate (closed)");
  else lua_pushfstring(L, "wxd.crypto.certificate: %p", (void *)c);
  return 1;
}

/* ---- PKCS#12 ---- */

/* Copies a key or certificate out of the private library context into the
 * default one (DER round trip), so that the private context can be freed. */
static EVP_PKEY *key_to_default_ctx(EVP_PKEY *pk) {
  unsigned char *der = NULL;
  int n = i2d_PrivateKey(pk, &der);
  if (n <= 0) return NULL;
  const unsigned char *p = der;
  EVP_PKEY *out = d2i_AutoPrivateKey_ex(NULL, &p, n, NULL, NULL);
  OPENSSL_clear_free(der, (size_t)n);
  return out;
}

static X509 *cert_to_default_ctx(X509 *x) {
  unsigned char *der = NULL;
  int n = i2d_X509(x, &der);
  if (n <= 0) return NULL;
  const unsigned char *p = der;
  X509 *out = d2i_X509(NULL, &p, n);
  OPENSSL_free(der);
  return out;
}

static int p12_mac_ok(PKCS12 *p12, const char *pass) {
  if (!PKCS12_mac_present(p12)) return 1;
  if (PKCS12_verify_mac(p12, pass, -1)) return 1;
  /* An empty passphrase may have been encoded either way (as PKCS12_parse
   * also tries). */
  return pass[0] == 0 && PKCS12_verify_mac(p12, NULL, 0);
}

int wxd_pkcs12_read(const void *der, size_t len, const char *pass, EVP_PKEY **key, X509 **leaf,
                    STACK_OF(X509) **chain) {
  *key = NULL;
  *leaf = NULL;
  *chain = NULL;
  OSSL_LIB_CTX *lib = OSSL_LIB_CTX_new();
  OSSL_PROVIDER *def = lib ? OSSL_PROVIDER_load(lib, "default") : NULL;
  OSSL_PROVIDER *legacy = def ? OSSL_PROVIDER_load(lib, "legacy") : NULL; /* optional */
  PKCS12 *p12 = def ? PKCS12_init_ex(NID_pkcs7_data, lib, NULL) : NULL;
  EVP_PKEY *pk = NULL;
  X509 *x = NULL;
  STACK_OF(X509) *cas = NULL;
  int rc = WXD_PKCS12_INVALID;
  const unsigned char *p = der;
  if (!p12) {
    rc = WXD_PKCS12_NOMEM;
    goto done;
  }
  if (!d2i_PKCS12(&p12, &p, (long)len) || (size_t)(p - (const unsigned char *)der) != len) goto done;
  if (!p12_mac_ok(p12, pass)) {
    rc = WXD_PKCS12_BAD_PASSPHRASE;
    goto done;
  }
  if (!PKCS12_parse(p12, pass, &pk, &x, &cas) || !pk || !x) goto done;
  if (!(*key = key_to_default_ctx(pk)) || !(*leaf = cert_to_default_ctx(x)) || !(*chain = sk_X509_new_null()))
    goto done;
  for (int i = 0; cas && i < sk_X509_num(cas); i++) {
    X509 *c = cert_to_default_ctx(sk_X509_value(cas, i));
    if (!c || !sk_X509_push(*chain, c)) {
      X509_free(c);
      goto done;
    }
  }
  rc = 0;
done:
  ERR_clear_error();
  if (rc != 0) {
    EVP_PKEY_free(*key);
    X509_free(*leaf);
    sk_X509_pop_free(*chain, X509_free);
    *key = NULL;
    *leaf = NULL;
    *chain = NULL;
  }
  EVP_PKEY_free(pk);
  X509_free(x);
  sk_X509_pop_free(cas, X509_free);
  PKCS12_free(p12);
  if (legacy) OSSL_PROVIDER_unload(legacy);
  if (def) OSSL_PROVIDER_unload(def);
  OSSL_LIB_CTX_free(lib);
  return rc;
}

/* load_pkcs12(der, passphrase) -> key, certificate, { ca certificate, ... }
 * | nil, "bad passphrase" | nil, "invalid pkcs12" (see wxd_pkcs12_read). */
static int crypto_load_pkcs12(lua_State *L) {
  size_t len, plen;
  const char *der = check_bytes(L, 1, &len);
  const char *pass = check_bytes(L, 2, &plen);
  if (strlen(pass) != plen) return luaL_argerror(L, 2, "passphrase contains a NUL byte");
  /* Every Lua object first, in a safe empty state: nothing below raises
   * while OpenSSL objects are unowned. */
  crypto_key_t *k = key_new(L);
  crypto_cert_t *c = cert_new(L);
  crypto_guard_t *g = guard_new(L);
  EVP_PKEY *pk;
  X509 *x;
  int rc = wxd_pkcs12_read(der, len, pass, &pk, &x, &g->certs);
  if (rc == WXD_PKCS12_NOMEM) return luaL_error(L, "cannot set up OpenSSL for PKCS#12");
  if (rc != 0) return push_fail(L, rc == WXD_PKCS12_BAD_PASSPHRASE ? "bad passphrase" : "invalid pkcs12");
  k->pkey = pk;
  c->x509 = x;
  if (!pkey_is_rsa(k->pkey)) {
    EVP_PKEY_free(k->pkey);
    k->pkey = NULL;
    X509_free(c->x509);
    c->x509 = NULL;
    guard_release(g);
    return push_fail(L, "invalid pkcs12");
  }
  k->priv = 1;
  push_cert_list(L, g);
  guard_release(g);
  lua_remove(L, -2); /* the guard: key, certificate and list are the results */
  return 3;
}

/* ---- registration ---- */

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc,
                      lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  if (tostring) {
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
  }
  /* getmetatable(key) gives this string, not the methods to patch. */
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
}

void wxd__crypto_open_rsa(lua_State *L) {
  static const luaL_Reg key_methods[] = {
      {"sign", key_sign},
      {"verify", key_verify},
      {"encrypt", key_encrypt},
      {"decrypt", key_decrypt},
      {"bits", key_bits},
      {"is_private", key_is_private},
      {"public_pem", key_public_pem},
      {"close", key_close},
      {NULL, NULL},
  };
  static const luaL_Reg cert_methods[] = {
      {"serial", cert_serial},
      {"subject", cert_subject},
      {"issuer", cert_issuer},
      {"not_before", cert_not_before},
      {"not_after", cert_not_after},
      {"fingerprint", cert_fingerprint},
      {"public_key", cert_public_key},
      {"pem", cert_pem},
      {"verify", cert_verify},
      {"close", cert_close},
      {NULL, NULL},
  };
  static const luaL_Reg fns[] = {
      {"load_private_key", crypto_load_private_key},
      {"load_public_key", crypto_load_public_key},
      {"load_certificate", crypto_load_certificate},
      {"load_certificates", crypto_load_certificates},
      {"load_pkcs12", crypto_load_pkcs12},
      {NULL, NULL},
  };
  new_class(L, KEY_MT, key_methods, key_close, key_tostring);
  new_class(L, CERT_MT, cert_methods, cert_close, cert_tostring);
  luaL_newmetatable(L, GUARD_MT);
  lua_pushcfunction(L, guard_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_register(L, NULL, fns);
}
