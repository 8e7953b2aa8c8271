/* ecdsa: ECDSA P-256 keys for wxd.core.crypto (JWT ES256, see
 * docs/crypto.md and docs/jwt.md).
 *
 * Only the curve P-256 with SHA-256 is offered: that is ES256, and a key of
 * another curve is refused at load time rather than used under the wrong
 * name. Signatures are in the JOSE form (RFC 7518 §3.4): r and s, each
 * left-padded to 32 bytes, concatenated; OpenSSL's DER form never crosses
 * into Lua. Keys are userdata that own their EVP_PKEY, freed by an
 * idempotent close bound to __gc; the userdata is made before the key is
 * acquired, so a Lua error cannot leak it.
 */
#define OPENSSL_NO_DEPRECATED 1

#include <lauxlib.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/decoder.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <string.h>

#include "crypto.h"

#define ECKEY_MT "wxd.crypto.eckey"
#define check_bytes wxd__crypto_check_bytes
#define P256_BYTES 32

typedef struct ec_key {
  EVP_PKEY *pkey; /* NULL once closed */
  int priv;
} ec_key_t;

static int push_fail(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static ec_key_t *eckey_new(lua_State *L) {
  ec_key_t *k = lua_newuserdata(L, sizeof *k);
  memset(k, 0, sizeof *k);
  luaL_getmetatable(L, ECKEY_MT);
  lua_setmetatable(L, -2);
  return k;
}

static ec_key_t *eckey_check(lua_State *L) {
  ec_key_t *k = luaL_checkudata(L, 1, ECKEY_MT);
  if (!k->pkey) luaL_error(L, "attempt to use a closed key");
  return k;
}

static int eckey_close(lua_State *L) {
  ec_key_t *k = luaL_checkudata(L, 1, ECKEY_MT);
  EVP_PKEY_free(k->pkey);
  k->pkey = NULL;
  return 0;
}

static int eckey_tostring(lua_State *L) {
  ec_key_t *k = luaL_checkudata(L, 1, ECKEY_MT);
  if (!k->pkey) lua_pushliteral(L, "wxd.crypto.eckey (closed)");
  else lua_pushfstring(L, "wxd.crypto.eckey (P-256 %s): %p", k->priv ? "private" : "public", (void *)k);
  return 1;
}

static int is_p256(EVP_PKEY *pk) {
  char name[64];
  size_t len = 0;
  return pk && EVP_PKEY_is_a(pk, "EC") &&
         EVP_PKEY_get_utf8_string_param(pk, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof name, &len) &&
         strcmp(name, "prime256v1") == 0;
}

static EVP_PKEY *decode_ec(const char *pem, size_t len, int selection) {
  EVP_PKEY *pk = NULL;
  OSSL_DECODER_CTX *d = OSSL_DECODER_CTX_new_for_pkey(&pk, "PEM", NULL, "EC", selection, NULL, NULL);
  if (d) {
    const unsigned char *p = (const unsigned char *)pem;
    size_t left = len;
    if (!OSSL_DECODER_from_data(d, &p, &left)) {
      EVP_PKEY_free(pk);
      pk = NULL;
    }
  }
  OSSL_DECODER_CTX_free(d);
  if (pk && !is_p256(pk)) {
    EVP_PKEY_free(pk);
    pk = NULL;
  }
  ERR_clear_error();
  return pk;
}

/* ec_load_private_key(pem) -> key | nil, "invalid key" (SEC1 "EC PRIVATE
 * KEY" or PKCS#8, unencrypted, curve P-256) */
static int ec_load_private_key(lua_State *L) {
  size_t len;
  const char *pem = check_bytes(L, 1, &len);
  ec_key_t *k = eckey_new(L);
  k->pkey = decode_ec(pem, len, EVP_PKEY_KEYPAIR);
  if (!k->pkey) return push_fail(L, "invalid key");
  k->priv = 1;
  return 1;
}

/* ec_load_public_key(pem) -> key | nil, "invalid key" ("PUBLIC KEY") */
static int ec_load_public_key(lua_State *L) {
  size_t len;
  const char *pem = check_bytes(L, 1, &len);
  ec_key_t *k = eckey_new(L);
  k->pkey = decode_ec(pem, len, EVP_PKEY_PUBLIC_KEY);
  if (!k->pkey) return push_fail(L, "invalid key");
  return 1;
}

/* key:sign(msg) -> 64 bytes r||s: ECDSA over SHA-256 (ES256). */
static int eckey_sign(lua_State *L) {
  ec_key_t *k = eckey_check(L);
  if (!k->priv) return luaL_error(L, "sign needs a private key");
  size_t len, derlen = 0;
  const char *msg = check_bytes(L, 2, &len);
  unsigned char der[128], out[2 * P256_BYTES];
  EVP_MD_CTX *m = EVP_MD_CTX_new();
  ECDSA_SIG *sig = NULL;
  int ok = m && EVP_DigestSignInit_ex(m, NULL, "SHA256", NULL, NULL, k->pkey, NULL) == 1 &&
           EVP_DigestSign(m, NULL, &derlen, (const unsigned char *)msg, len) == 1 && derlen <= sizeof der &&
           EVP_DigestSign(m, der, &derlen, (const unsigned char *)msg, len) == 1;
  if (ok) {
    const unsigned char *p = der;
    sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
    const BIGNUM *r = NULL, *s = NULL;
    if (sig) ECDSA_SIG_get0(sig, &r, &s);
    ok = sig && BN_bn2binpad(r, out, P256_BYTES) == P256_BYTES &&
         BN_bn2binpad(s, out + P256_BYTES, P256_BYTES) == P256_BYTES;
  }
  ECDSA_SIG_free(sig);
  EVP_MD_CTX_free(m);
  ERR_clear_error();
  if (!ok) return luaL_error(L, "ECDSA signing failed");
  lua_pushlstring(L, (const char *)out, sizeof out);
  return 1;
}

/* key:verify(msg, sig) -> true | nil, "bad signature"; sig is r||s (64
 * bytes). Any other length is a bad signature, not an error: it comes
 * from the wire. */
static int eckey_verify(lua_State *L) {
  ec_key_t *k = eckey_check(L);
  size_t len, siglen;
  const char *msg = check_bytes(L, 2, &len);
  const unsigned char *raw = (const unsigned char *)check_bytes(L, 3, &siglen);
  if (siglen != 2 * P256_BYTES) return push_fail(L, "bad signature");
  ECDSA_SIG *sig = ECDSA_SIG_new();
  BIGNUM *r = BN_bin2bn(raw, P256_BYTES, NULL);
  BIGNUM *s = BN_bin2bn(raw + P256_BYTES, P256_BYTES, NULL);
  unsigned char *der = NULL;
  int derlen = -1, ok = 0;
  if (sig && r && s && ECDSA_SIG_set0(sig, r, s)) {
    r = s = NULL; /* owned by sig now */
    derlen = i2d_ECDSA_SIG(sig, &der);
  }
  EVP_MD_CTX *m = derlen > 0 ? EVP_MD_CTX_new() : NULL;
  ok = m && EVP_DigestVerifyInit_ex(m, NULL, "SHA256", NULL, NULL, k->pkey, NULL) == 1 &&
       EVP_DigestVerify(m, der, (size_t)derlen, (const unsigned char *)msg, len) == 1;
  EVP_MD_CTX_free(m);
  OPENSSL_free(der);
  BN_free(r);
  BN_free(s);
  ECDSA_SIG_free(sig);
  ERR_clear_error();
  if (!ok) return push_fail(L, "bad signature");
  lua_pushboolean(L, 1);
  return 1;
}

static int eckey_is_private(lua_State *L) {
  lua_pushboolean(L, eckey_check(L)->priv);
  return 1;
}

void wxd__crypto_open_ecdsa(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"sign", eckey_sign},
      {"verify", eckey_verify},
      {"is_private", eckey_is_private},
      {"close", eckey_close},
      {NULL, NULL},
  };
  static const luaL_Reg fns[] = {
      {"ec_load_private_key", ec_load_private_key},
      {"ec_load_public_key", ec_load_public_key},
      {NULL, NULL},
  };
  luaL_newmetatable(L, ECKEY_MT);
  lua_newtable(L);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, eckey_close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, eckey_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushstring(L, ECKEY_MT);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  luaL_register(L, NULL, fns);
}
