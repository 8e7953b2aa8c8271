/* crypto: see crypto.h. This file holds the buffer functions (encodings,
 * padding, comparison, randomness), digests, HMAC and AES; rsa.c holds keys,
 * certificates and PKCS#12. */
/* Deprecated OpenSSL interfaces are hidden so that using one fails to build. */
#define OPENSSL_NO_DEPRECATED 1

#include "crypto.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/params.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

/* ---- buffer functions (no Lua) ---- */

static const char b64_std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char b64_url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t wxd_base64_encode(const unsigned char *in, size_t len, char *out, int alphabet, int pad) {
  const char *tab = alphabet == WXD_BASE64_URL ? b64_url : b64_std;
  if (alphabet != WXD_BASE64_URL) pad = 1;
  size_t o = 0, i = 0;
  for (; i + 3 <= len; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    out[o++] = tab[v >> 18];
    out[o++] = tab[(v >> 12) & 63];
    out[o++] = tab[(v >> 6) & 63];
    out[o++] = tab[v & 63];
  }
  if (len - i == 1) {
    uint32_t v = (uint32_t)in[i] << 16;
    out[o++] = tab[v >> 18];
    out[o++] = tab[(v >> 12) & 63];
    if (pad) {
      out[o++] = '=';
      out[o++] = '=';
    }
  } else if (len - i == 2) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
    out[o++] = tab[v >> 18];
    out[o++] = tab[(v >> 12) & 63];
    out[o++] = tab[(v >> 6) & 63];
    if (pad) out[o++] = '=';
  }
  return o;
}

/* -1 (all ones) when lo <= c <= hi, else 0, without a branch: base64 and
 * hex often carry keys, and a table lookup or a branch per character would
 * leak them through the cache or the branch predictor. */
static int in_range(int c, int lo, int hi) { return ((lo - 1 - c) & (c - (hi + 1))) >> 8; }
static int is_char(int c, int ch) { return (((c ^ ch) - 1) >> 8); }
/* -1 when 0 < x < 256, else 0 (x = 0), without a branch. */
static int nonzero(int x) { return (0 - x) >> 8; }

#define B64_CHUNK 64

/* Maps B64_CHUNK characters to their 6-bit values, -1 outside the alphabet
 * (c62 and c63 are its last two characters). The fixed trip count and the
 * restrict pointers let the compiler vectorize the loop at -O2: 3-4 times
 * faster than mapping one quantum at a time. */
static void b64_map(const unsigned char *restrict in, signed char *restrict v, int c62, int c63) {
  for (int i = 0; i < B64_CHUNK; i++) {
    int c = in[i], r = -1;
    r += in_range(c, 'A', 'Z') & (c - 'A' + 1);
    r += in_range(c, 'a', 'z') & (c - 'a' + 26 + 1);
    r += in_range(c, '0', '9') & (c - '0' + 52 + 1);
    r += is_char(c, c62) & (62 + 1);
    r += is_char(c, c63) & (63 + 1);
    v[i] = (signed char)r;
  }
}

int wxd_base64_decode(const char *in, size_t len, unsigned char *out, size_t *outlen, int mode) {
  int alphabet = mode & WXD_BASE64_URL;
  /* All ones when the unused bits of the last character must be zero. */
  int strict_tail = (mode & WXD_BASE64_ANY_TAIL) ? 0 : -1;
  size_t pad = 0;
  if (len >= 1 && in[len - 1] == '=') pad = (len >= 2 && in[len - 2] == '=') ? 2 : 1;
  /* Padded input is whole quanta; the standard alphabet requires padding. */
  if ((pad || alphabet != WXD_BASE64_URL) && len % 4 != 0) return -1;
  size_t n = len - pad;
  if (n % 4 == 1) return -1; /* one character carries 6 bits: not a byte */
  int url = alphabet == WXD_BASE64_URL;
  signed char v[B64_CHUNK];
  unsigned char tmp[B64_CHUNK];
  int err = 0;
  size_t o = 0;
  for (size_t base = 0; base < n; base += B64_CHUNK) {
    size_t m = n - base < B64_CHUNK ? n - base : B64_CHUNK;
    const unsigned char *src = (const unsigned char *)in + base;
    if (m < B64_CHUNK) { /* the last chunk: fill up with a valid character */
      memset(tmp, 'A', sizeof tmp);
      memcpy(tmp, src, m);
      src = tmp;
    }
    /* Constant arguments, so that each call is specialized and vectorized. */
    if (url) b64_map(src, v, '-', '_');
    else b64_map(src, v, '+', '/');
    size_t i = 0;
    for (; i + 4 <= m; i += 4) {
      int a = v[i], b = v[i + 1], c = v[i + 2], d = v[i + 3];
      err |= a | b | c | d;
      uint32_t x = (uint32_t)(a & 63) << 18 | (uint32_t)(b & 63) << 12 | (uint32_t)(c & 63) << 6 | (uint32_t)(d & 63);
      out[o++] = (unsigned char)(x >> 16);
      out[o++] = (unsigned char)(x >> 8);
      out[o++] = (unsigned char)x;
    }
    /* B64_CHUNK is a multiple of 4, so a partial quantum ends the input. */
    if (m - i == 2) {
      int a = v[i], b = v[i + 1];
      err |= a | b | (nonzero(b & 15) & strict_tail);
      out[o++] = (unsigned char)((a & 63) << 2 | (b & 63) >> 4);
    } else if (m - i == 3) {
      int a = v[i], b = v[i + 1], c = v[i + 2];
      err |= a | b | c | (nonzero(c & 3) & strict_tail);
      out[o++] = (unsigned char)((a & 63) << 2 | (b & 63) >> 4);
      out[o++] = (unsigned char)(((b & 15) << 4) | (c & 63) >> 2);
    }
  }
  OPENSSL_cleanse(v, sizeof v);
  OPENSSL_cleanse(tmp, sizeof tmp);
  if (err < 0) return -1;
  *outlen = o;
  return 0;
}

void wxd_hex_encode(const unsigned char *in, size_t len, char *out, int upper) {
  const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
  for (size_t i = 0; i < len; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 15];
  }
}

static int hex_value(unsigned char uc) {
  int c = uc, r = -1;
  r += in_range(c, '0', '9') & (c - '0' + 1);
  r += in_range(c, 'a', 'f') & (c - 'a' + 10 + 1);
  r += in_range(c, 'A', 'F') & (c - 'A' + 10 + 1);
  return r;
}

int wxd_hex_decode(const char *in, size_t len, unsigned char *out) {
  if (len % 2) return -1;
  int err = 0;
  for (size_t i = 0; i < len; i += 2) {
    int hi = hex_value((unsigned char)in[i]), lo = hex_value((unsigned char)in[i + 1]);
    err |= hi | lo;
    out[i / 2] = (unsigned char)((hi & 15) << 4 | (lo & 15));
  }
  return err < 0 ? -1 : 0;
}

size_t wxd_pkcs7_pad(unsigned char *buf, size_t len, size_t block) {
  size_t p = block - len % block;
  memset(buf + len, (int)p, p);
  return len + p;
}

int wxd_pkcs7_unpad(const unsigned char *buf, size_t len, size_t block, size_t *outlen) {
  if (len == 0 || block == 0 || block > 255) return -1;
  /* Every quantity below is at most 255, so "a < b" is the top bit of the
   * 32-bit difference a - b. */
  unsigned check = (unsigned)(block < len ? block : len);
  unsigned p = buf[len - 1];
  unsigned bad = (p - 1) >> 31;   /* p == 0 */
  bad |= (check - p) >> 31;       /* p > block or p > len */
  for (unsigned i = 1; i <= check; i++) {
    unsigned in_pad = 0u - (((i - 1) - p) >> 31); /* all ones when i <= p */
    bad |= in_pad & (buf[len - i] ^ p);
  }
  if (bad) return -1;
  *outlen = len - p;
  return 0;
}

int wxd_ct_equal(const void *a, size_t alen, const void *b, size_t blen) {
  if (alen != blen) return 0;
  if (alen == 0) return 1;
  return CRYPTO_memcmp(a, b, alen) == 0;
}

/* Small requests (a nonce, an IV, a token: several per WeChat message) are
 * served from a per-thread block of DRBG output, refilled 4 KiB at a time:
 * every RAND_bytes call costs a getpid(2) (OpenSSL's fork check), which
 * showed as two system calls per message next to one read and one write.
 * Bytes handed out are wiped from the block at once. Per thread, so
 * unshared; wxd never forks without exec. */
#define RANDOM_POOL 4096
#define RANDOM_POOL_MAX_REQUEST 256

static int random_direct(unsigned char *p, size_t len) {
  while (len > 0) {
    int n = len > (size_t)INT_MAX ? INT_MAX : (int)len;
    if (RAND_bytes(p, n) != 1) {
      ERR_clear_error();
      errno = EIO;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

int wxd_random_bytes(void *buf, size_t len) {
  static _Thread_local unsigned char pool[RANDOM_POOL];
  static _Thread_local size_t left; /* unread bytes at the end of pool */
  if (len > RANDOM_POOL_MAX_REQUEST) return random_direct(buf, len);
  if (left < len) {
    if (random_direct(pool, RANDOM_POOL) != 0) return -1;
    left = RANDOM_POOL;
  }
  unsigned char *from = pool + RANDOM_POOL - left;
  memcpy(buf, from, len);
  OPENSSL_cleanse(from, len);
  left -= len;
  return 0;
}

/* ---- Lua: shared helpers ---- */

#define ALGS_MT "wxd.crypto.algs"
#define STACK_SCRATCH 4096
#define CRYPTO_MAX_INPUT ((size_t)INT_MAX - 512) /* EVP lengths are int */

enum { MD_MD5, MD_SHA1, MD_SHA256, MD_COUNT };
enum { MODE_CBC, MODE_ECB, MODE_GCM, MODE_COUNT };

/* Algorithms fetched once per Lua state: an implicit fetch on every call
 * (EVP_sha256() and friends) costs more than hashing a short string. Held
 * by the module's functions as upvalue 1 and freed by __gc. */
typedef struct crypto_algs {
  EVP_MD *md[MD_COUNT];
  EVP_CIPHER *cipher[MODE_COUNT][3];  /* by key size: 16, 24, 32 bytes */
  EVP_CIPHER_CTX *ctx[MODE_COUNT][3]; /* CBC and ECB contexts, re-keyed per call */
} crypto_algs_t;

static const char *const md_names[MD_COUNT] = {"MD5", "SHA1", "SHA256"};
static const char *const cipher_names[MODE_COUNT][3] = {
    {"AES-128-CBC", "AES-192-CBC", "AES-256-CBC"},
    {"AES-128-ECB", "AES-192-ECB", "AES-256-ECB"},
    {"AES-128-GCM", "AES-192-GCM", "AES-256-GCM"},
};

static int algs_gc(lua_State *L) {
  crypto_algs_t *a = luaL_checkudata(L, 1, ALGS_MT);
  for (int i = 0; i < MD_COUNT; i++) {
    EVP_MD_free(a->md[i]);
    a->md[i] = NULL;
  }
  for (int m = 0; m < MODE_COUNT; m++)
    for (int k = 0; k < 3; k++) {
      EVP_CIPHER_CTX_free(a->ctx[m][k]); /* cleanses the key schedule */
      a->ctx[m][k] = NULL;
      EVP_CIPHER_free(a->cipher[m][k]);
      a->cipher[m][k] = NULL;
    }
  return 0;
}

static crypto_algs_t *algs_get(lua_State *L) {
  return lua_touserdata(L, lua_upvalueindex(1));
}

/* A string argument; numbers are refused rather than converted, because a
 * number where bytes belong is a bug (a key read as a number, say). */
const char *wxd__crypto_check_bytes(lua_State *L, int idx, size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING) luaL_typerror(L, idx, "string");
  const char *s = lua_tolstring(L, idx, len);
  if (*len > CRYPTO_MAX_INPUT) luaL_argerror(L, idx, "input too large");
  return s;
}
#define check_bytes wxd__crypto_check_bytes

static const char *opt_bytes(lua_State *L, int idx, size_t *len) {
  if (lua_isnoneornil(L, idx)) {
    *len = 0;
    return "";
  }
  return check_bytes(L, idx, len);
}

/* Working memory for an output: the C stack when it is small, else a
 * userdata left on the Lua stack (owned by the collector, so a Lua error
 * cannot leak it). Callers cleanse what they used. */
static unsigned char *scratch(lua_State *L, unsigned char *stackbuf, size_t need) {
  if (need <= STACK_SCRATCH) return stackbuf;
  return lua_newuserdata(L, need);
}

static int push_fail(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* ---- digests and MACs ---- */

/* Pushes a digest or MAC, raw or as lower-case hex. */
static void push_md(lua_State *L, const unsigned char *md, size_t mdlen, int hex) {
  if (hex) {
    char out[2 * EVP_MAX_MD_SIZE];
    wxd_hex_encode(md, mdlen, out, 0);
    lua_pushlstring(L, out, 2 * mdlen);
  } else {
    lua_pushlstring(L, (const char *)md, mdlen);
  }
}

/* digest(s): upvalues are the algs, the MD_* index and a hex flag. */
static int crypto_digest(lua_State *L) {
  size_t len;
  const char *s = check_bytes(L, 1, &len);
  crypto_algs_t *a = algs_get(L);
  int which = (int)lua_tointeger(L, lua_upvalueindex(2));
  int hex = lua_toboolean(L, lua_upvalueindex(3));
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  if (!a->md[which] || !EVP_Digest(s, len, md, &mdlen, a->md[which], NULL)) {
    ERR_clear_error();
    return luaL_error(L, "%s is not available in this OpenSSL", md_names[which]);
  }
  push_md(L, md, mdlen, hex);
  return 1;
}

/* hmac(key, msg): same upvalues as digest. */
static int crypto_hmac(lua_State *L) {
  size_t klen, mlen;
  const char *key = check_bytes(L, 1, &klen);
  const char *msg = check_bytes(L, 2, &mlen);
  crypto_algs_t *a = algs_get(L);
  int which = (int)lua_tointeger(L, lua_upvalueindex(2));
  int hex = lua_toboolean(L, lua_upvalueindex(3));
  unsigned char md[EVP_MAX_MD_SIZE];
  /* EVP_Q_mac wants a non-NULL key pointer even for an empty key. */
  static const unsigned char empty[1];
  size_t mdlen = 0;
  if (!a->md[which] ||
      !EVP_Q_mac(NULL, "HMAC", NULL, EVP_MD_get0_name(a->md[which]), NULL,
                 klen ? (const void *)key : empty, klen, (const unsigned char *)msg, mlen, md, sizeof md,
                 &mdlen)) {
    ERR_clear_error();
    return luaL_error(L, "HMAC-%s is not available in this OpenSSL", md_names[which]);
  }
  push_md(L, md, mdlen, hex);
  OPENSSL_cleanse(md, sizeof md);
  return 1;
}

/* equals(a, b): constant-time for equal lengths. */
static int crypto_equals(lua_State *L) {
  size_t alen, blen;
  const char *a = check_bytes(L, 1, &alen);
  const char *b = check_bytes(L, 2, &blen);
  lua_pushboolean(L, wxd_ct_equal(a, alen, b, blen));
  return 1;
}

/* ---- encodings ---- */

/* base64_encode(s [, url [, pad]]) */
static int crypto_base64_encode(lua_State *L) {
  size_t len;
  const char *s = check_bytes(L, 1, &len);
  int url = lua_toboolean(L, 2);
  int pad = url ? lua_toboolean(L, 3) : 1;
  unsigned char sbuf[STACK_SCRATCH];
  char *out = (char *)scratch(L, sbuf, WXD_BASE64_ENCODED_LEN(len));
  size_t n = wxd_base64_encode((const unsigned char *)s, len, out, url ? WXD_BASE64_URL : WXD_BASE64_STD, pad);
  lua_pushlstring(L, out, n);
  return 1;
}

/* base64_decode(s [, url [, any_tail]]) -> bytes | nil, "invalid base64" */
static int crypto_base64_decode(lua_State *L) {
  size_t len, n = 0;
  const char *s = check_bytes(L, 1, &len);
  int mode = (lua_toboolean(L, 2) ? WXD_BASE64_URL : WXD_BASE64_STD) | (lua_toboolean(L, 3) ? WXD_BASE64_ANY_TAIL : 0);
  unsigned char sbuf[STACK_SCRATCH];
  size_t cap = WXD_BASE64_DECODED_MAX(len);
  unsigned char *out = scratch(L, sbuf, cap);
  int rc = wxd_base64_decode(s, len, out, &n, mode);
  if (rc == 0) lua_pushlstring(L, (const char *)out, n);
  OPENSSL_cleanse(out, cap); /* it may be a key */
  if (rc != 0) return push_fail(L, "invalid base64");
  return 1;
}

/* hex_encode(s [, upper]) */
static int crypto_hex_encode(lua_State *L) {
  size_t len;
  const char *s = check_bytes(L, 1, &len);
  if (len > CRYPTO_MAX_INPUT / 2) return luaL_argerror(L, 1, "input too large");
  unsigned char sbuf[STACK_SCRATCH];
  char *out = (char *)scratch(L, sbuf, 2 * len);
  wxd_hex_encode((const unsigned char *)s, len, out, lua_toboolean(L, 2));
  lua_pushlstring(L, out, 2 * len);
  return 1;
}

/* hex_decode(s) -> bytes | nil, "invalid hex" */
static int crypto_hex_decode(lua_State *L) {
  size_t len;
  const char *s = check_bytes(L, 1, &len);
  unsigned char sbuf[STACK_SCRATCH];
  unsigned char *out = scratch(L, sbuf, len / 2 + 1);
  int rc = wxd_hex_decode(s, len, out);
  if (rc == 0) lua_pushlstring(L, (const char *)out, len / 2);
  OPENSSL_cleanse(out, len / 2 + 1);
  if (rc != 0) return push_fail(L, "invalid hex");
  return 1;
}

/* ---- randomness ---- */

#define RANDOM_MAX (1 << 20)

static size_t check_count(lua_State *L, int idx, size_t lo, size_t hi) {
  if (lua_type(L, idx) != LUA_TNUMBER) luaL_typerror(L, idx, "number");
  lua_Number n = lua_tonumber(L, idx);
  if (!(n >= (lua_Number)lo && n <= (lua_Number)hi) || n != (lua_Number)(size_t)n)
    luaL_argerror(L, idx, lua_pushfstring(L, "expected an integer in %d..%d", (int)lo, (int)hi));
  return (size_t)n;
}

/* random_bytes(n) */
static int crypto_random_bytes(lua_State *L) {
  size_t n = check_count(L, 1, 0, RANDOM_MAX);
  unsigned char sbuf[STACK_SCRATCH];
  unsigned char *out = scratch(L, sbuf, n);
  if (wxd_random_bytes(out, n) != 0) return luaL_error(L, "random_bytes: getrandom failed (errno %d)", errno);
  lua_pushlstring(L, (const char *)out, n);
  OPENSSL_cleanse(out, n);
  return 1;
}

/* nonce(n): n characters of [A-Za-z0-9], each uniform. */
static int crypto_nonce(lua_State *L) {
  static const char alnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  size_t n = check_count(L, 1, 1, 4096);
  char out[4096];
  unsigned char rnd[256];
  size_t got = 0;
  while (got < n) {
    if (wxd_random_bytes(rnd, sizeof rnd) != 0) return luaL_error(L, "nonce: getrandom failed (errno %d)", errno);
    /* 248 = 4 * 62: bytes above it are dropped so that every character is
     * equally likely (no modulo bias). */
    for (size_t i = 0; i < sizeof rnd && got < n; i++)
      if (rnd[i] < 248) out[got++] = alnum[rnd[i] % 62];
  }
  OPENSSL_cleanse(rnd, sizeof rnd);
  lua_pushlstring(L, out, n);
  OPENSSL_cleanse(out, n);
  return 1;
}

/* ---- AES ---- */

#define DECRYPT_FAILED "decrypt failed"

/* An AES cipher chosen by mode and key size, with its key. */
typedef struct aes {
  crypto_algs_t *algs;
  int mode;
  int k; /* 0, 1, 2 for 16, 24, 32-byte keys */
  const unsigned char *key;
} aes_t;

/* The key argument: 16, 24 or 32 bytes. Any other length gives c.k < 0 and
 * the caller returns nil, "invalid key": keys often come from outside
 * (a decoded EncodingAESKey, a merchant's APIv3 key), so a wrong one is an
 * expected failure, reported without the bytes. A non-string raises. */
static aes_t check_aes_key(lua_State *L, int idx, int mode) {
  size_t klen;
  aes_t c = {algs_get(L), mode, 0, NULL};
  c.key = (const unsigned char *)check_bytes(L, idx, &klen);
  c.k = klen == 16 ? 0 : klen == 24 ? 1 : klen == 32 ? 2 : -1;
  if (c.k >= 0 && !c.algs->cipher[mode][c.k])
    luaL_error(L, "%s is not available in this OpenSSL", cipher_names[mode][c.k]);
  return c;
}

/* The pad block of a decryption: 1..255 (a PKCS#7 pad value is one byte). */
static size_t check_unpad_block(lua_State *L, int idx) {
  return check_count(L, idx, 1, 255);
}

/* The pad block of an encryption: a multiple of the AES block (16..240),
 * since the padded plaintext must be whole AES blocks. */
static size_t check_pad_block(lua_State *L, int idx) {
  size_t b = check_count(L, idx, 16, 240);
  if (b % 16) luaL_argerror(L, idx, "pad block must be a multiple of 16 for AES");
  return b;
}

/* Runs AES-CBC or AES-ECB without OpenSSL's padding (ours is stricter and
 * takes a pad block) over in[0..len) into out. Returns the output length,
 * or -1. The context is kept per Lua state and cipher and re-keyed on each
 * call: creating and freeing one, and setting its padding, cost more than
 * decrypting a 1 KiB message. It holds the last key schedule until the next
 * call or the state's end (the key itself is a Lua string anyway); after a
 * failure it is freed and made anew. */
static int aes_run(aes_t c, int enc, const unsigned char *iv, const unsigned char *in, size_t len,
                   unsigned char *out) {
  EVP_CIPHER_CTX **slot = &c.algs->ctx[c.mode][c.k];
  int n1 = 0, n2 = 0, ok;
  if (*slot) {
    ok = EVP_CipherInit_ex2(*slot, NULL, c.key, iv, enc, NULL);
  } else {
    ok = (*slot = EVP_CIPHER_CTX_new()) != NULL &&
         EVP_CipherInit_ex2(*slot, c.algs->cipher[c.mode][c.k], c.key, iv, enc, NULL) &&
         EVP_CIPHER_CTX_set_padding(*slot, 0);
  }
  ok = ok && (len == 0 || EVP_CipherUpdate(*slot, out, &n1, in, (int)len)) &&
       EVP_CipherFinal_ex(*slot, out + n1, &n2);
  if (!ok) {
    EVP_CIPHER_CTX_free(*slot);
    *slot = NULL;
    ERR_clear_error();
    return -1;
  }
  return n1 + n2;
}

int wxd__crypto_aes256_cbc(lua_State *L, int enc, const unsigned char *key, const unsigned char *iv,
                           const unsigned char *in, size_t len, unsigned char *out) {
  aes_t c = {algs_get(L), MODE_CBC, 2, key};
  if (!c.algs->cipher[MODE_CBC][2] || len > CRYPTO_MAX_INPUT) return -1;
  return aes_run(c, enc, iv, in, len, out);
}

static int digest_into(lua_State *L, int which, const void *data, size_t len, unsigned char *out) {
  crypto_algs_t *a = algs_get(L);
  unsigned int n = 0;
  if (!a->md[which] || len > CRYPTO_MAX_INPUT || !EVP_Digest(data, len, out, &n, a->md[which], NULL)) {
    ERR_clear_error();
    return -1;
  }
  return 0;
}

int wxd__crypto_sha1(lua_State *L, const void *data, size_t len, unsigned char *out) {
  return digest_into(L, MD_SHA1, data, len, out);
}

int wxd__crypto_sha256(lua_State *L, const void *data, size_t len, unsigned char *out) {
  return digest_into(L, MD_SHA256, data, len, out);
}

/* Encrypts with PKCS#7 padding to `block`; pushes the ciphertext. */
static int aes_encrypt_padded(lua_State *L, aes_t c, const unsigned char *iv, const char *plain, size_t len,
                              size_t block) {
  if (len > CRYPTO_MAX_INPUT - block) return luaL_argerror(L, 3, "input too large");
  unsigned char sbuf[STACK_SCRATCH];
  size_t cap = len + block + 16;
  unsigned char *buf = scratch(L, sbuf, cap);
  memcpy(buf, plain, len);
  size_t padded = wxd_pkcs7_pad(buf, len, block);
  /* In place: EVP allows out == in exactly. */
  int n = aes_run(c, 1, iv, buf, padded, buf);
  if (n < 0) {
    OPENSSL_cleanse(buf, cap);
    return luaL_error(L, "AES encryption failed"); /* OpenSSL out of memory */
  }
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  OPENSSL_cleanse(buf, cap);
  return 1;
}

/* Decrypts and checks PKCS#7 padding to `block`; pushes the plaintext or
 * nil, "decrypt failed". */
static int aes_decrypt_padded(lua_State *L, aes_t c, const unsigned char *iv, const char *ct, size_t len,
                              size_t block) {
  if (len == 0 || len % 16 != 0) return push_fail(L, DECRYPT_FAILED);
  unsigned char sbuf[STACK_SCRATCH];
  size_t cap = len + 16;
  unsigned char *buf = scratch(L, sbuf, cap);
  size_t plen = 0;
  int n = aes_run(c, 0, iv, (const unsigned char *)ct, len, buf);
  int ok = n == (int)len && wxd_pkcs7_unpad(buf, len, block, &plen) == 0;
  if (ok) lua_pushlstring(L, (const char *)buf, plen);
  OPENSSL_cleanse(buf, cap);
  if (!ok) return push_fail(L, DECRYPT_FAILED);
  return 1;
}

/* aes_cbc_encrypt(key, iv, plaintext, pad_block) */
static int crypto_aes_cbc_encrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_CBC);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t ivlen, len;
  const char *iv = check_bytes(L, 2, &ivlen);
  if (ivlen != 16) return luaL_argerror(L, 2, lua_pushfstring(L, "IV must be 16 bytes, got %d", (int)ivlen));
  const char *plain = check_bytes(L, 3, &len);
  size_t block = check_pad_block(L, 4);
  return aes_encrypt_padded(L, c, (const unsigned char *)iv, plain, len, block);
}

/* aes_cbc_decrypt(key, iv, ciphertext, pad_block). The IV usually comes
 * with the message (a Mini Program sends it), so a wrong-sized one is a
 * failed decryption, not a raised error. */
static int crypto_aes_cbc_decrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_CBC);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t ivlen, len;
  const char *iv = check_bytes(L, 2, &ivlen);
  const char *ct = check_bytes(L, 3, &len);
  size_t block = check_unpad_block(L, 4);
  if (ivlen != 16) return push_fail(L, DECRYPT_FAILED);
  return aes_decrypt_padded(L, c, (const unsigned char *)iv, ct, len, block);
}

/* aes_ecb_encrypt(key, plaintext): PKCS#7 to 16 bytes. */
static int crypto_aes_ecb_encrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_ECB);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t len;
  const char *plain = check_bytes(L, 2, &len);
  return aes_encrypt_padded(L, c, NULL, plain, len, 16);
}

/* aes_ecb_decrypt(key, ciphertext) */
static int crypto_aes_ecb_decrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_ECB);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t len;
  const char *ct = check_bytes(L, 2, &len);
  return aes_decrypt_padded(L, c, NULL, ct, len, 16);
}

#define GCM_TAG 16
#define GCM_NONCE_MAX 128

/* One GCM pass. enc: in is the plaintext and tag receives the tag; else in
 * is the ciphertext without its tag and tag is checked. Returns 0 or -1;
 * the context is freed on every path. */
static int gcm_run(const EVP_CIPHER *cipher, int enc, const unsigned char *key, const unsigned char *nonce,
                   size_t nlen, const unsigned char *aad, size_t alen, const unsigned char *in, size_t len,
                   unsigned char *out, unsigned char *tag) {
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  size_t ivlen = nlen;
  OSSL_PARAM ivp[] = {OSSL_PARAM_construct_size_t(OSSL_CIPHER_PARAM_AEAD_IVLEN, &ivlen), OSSL_PARAM_construct_end()};
  OSSL_PARAM tagp[] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, GCM_TAG),
                       OSSL_PARAM_construct_end()};
  int n = 0, ok = 0;
  if (!ctx || !EVP_CipherInit_ex2(ctx, cipher, NULL, NULL, enc, ivp) ||
      !EVP_CipherInit_ex2(ctx, NULL, key, nonce, enc, NULL))
    goto done;
  if (alen && !EVP_CipherUpdate(ctx, NULL, &n, aad, (int)alen)) goto done;
  if (len && !EVP_CipherUpdate(ctx, out, &n, in, (int)len)) goto done;
  if (!enc && !EVP_CIPHER_CTX_set_params(ctx, tagp)) goto done;
  if (!EVP_CipherFinal_ex(ctx, out + n, &n)) goto done;
  if (enc && !EVP_CIPHER_CTX_get_params(ctx, tagp)) goto done;
  ok = 1;
done:
  EVP_CIPHER_CTX_free(ctx);
  if (!ok) ERR_clear_error();
  return ok ? 0 : -1;
}

/* aes_gcm_encrypt(key, nonce, plaintext [, aad]) -> ciphertext .. tag */
static int crypto_aes_gcm_encrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_GCM);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t nlen, len, alen;
  const char *nonce = check_bytes(L, 2, &nlen);
  if (nlen < 1 || nlen > GCM_NONCE_MAX)
    return luaL_argerror(L, 2, lua_pushfstring(L, "nonce must be 1..%d bytes (12 is usual)", GCM_NONCE_MAX));
  const char *plain = check_bytes(L, 3, &len);
  const char *aad = opt_bytes(L, 4, &alen);
  unsigned char sbuf[STACK_SCRATCH];
  size_t cap = len + GCM_TAG + 16;
  unsigned char *buf = scratch(L, sbuf, cap);
  if (gcm_run(c.algs->cipher[MODE_GCM][c.k], 1, c.key, (const unsigned char *)nonce, nlen, (const unsigned char *)aad, alen,
              (const unsigned char *)plain, len, buf, buf + len) != 0) {
    OPENSSL_cleanse(buf, cap);
    return luaL_error(L, "AES-GCM encryption failed");
  }
  lua_pushlstring(L, (const char *)buf, len + GCM_TAG);
  OPENSSL_cleanse(buf, cap);
  return 1;
}

/* aes_gcm_decrypt(key, nonce, ciphertext .. tag [, aad]) -> plaintext |
 * nil, "decrypt failed". Nothing of the plaintext leaves before the tag is
 * checked. */
static int crypto_aes_gcm_decrypt(lua_State *L) {
  aes_t c = check_aes_key(L, 1, MODE_GCM);
  if (c.k < 0) return push_fail(L, "invalid key");
  size_t nlen, len, alen;
  const char *nonce = check_bytes(L, 2, &nlen);
  const char *ct = check_bytes(L, 3, &len);
  const char *aad = opt_bytes(L, 4, &alen);
  if (nlen < 1 || nlen > GCM_NONCE_MAX || len < GCM_TAG) return push_fail(L, DECRYPT_FAILED);
  size_t clen = len - GCM_TAG;
  unsigned char tag[GCM_TAG];
  memcpy(tag, ct + clen, GCM_TAG);
  unsigned char sbuf[STACK_SCRATCH];
  size_t cap = clen + 16;
  unsigned char *buf = scratch(L, sbuf, cap);
  int rc = gcm_run(c.algs->cipher[MODE_GCM][c.k], 0, c.key, (const unsigned char *)nonce, nlen, (const unsigned char *)aad, alen,
                   (const unsigned char *)ct, clen, buf, tag);
  if (rc == 0) lua_pushlstring(L, (const char *)buf, clen);
  OPENSSL_cleanse(buf, cap);
  if (rc != 0) return push_fail(L, DECRYPT_FAILED);
  return 1;
}

/* ---- registrar ---- */

static void push_algs(lua_State *L) {
  crypto_algs_t *a = lua_newuserdata(L, sizeof *a);
  memset(a, 0, sizeof *a);
  luaL_newmetatable(L, ALGS_MT);
  lua_pushcfunction(L, algs_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  /* A missing algorithm (MD5 under a FIPS configuration, say) stays NULL
   * and raises when used, rather than failing the whole module. */
  for (int i = 0; i < MD_COUNT; i++) a->md[i] = EVP_MD_fetch(NULL, md_names[i], NULL);
  for (int m = 0; m < MODE_COUNT; m++)
    for (int k = 0; k < 3; k++) a->cipher[m][k] = EVP_CIPHER_fetch(NULL, cipher_names[m][k], NULL);
  ERR_clear_error();
}

/* Sets t[name] = closure(fn, algs, which, hex); algs at index `algs`. */
static void set_md_fn(lua_State *L, int algs, const char *name, lua_CFunction fn, int which, int hex) {
  lua_pushvalue(L, algs);
  lua_pushinteger(L, which);
  lua_pushboolean(L, hex);
  lua_pushcclosure(L, fn, 3);
  lua_setfield(L, -2, name);
}

int wxd_open_crypto(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"equals", crypto_equals},
      {"base64_encode", crypto_base64_encode},
      {"base64_decode", crypto_base64_decode},
      {"hex_encode", crypto_hex_encode},
      {"hex_decode", crypto_hex_decode},
      {"random_bytes", crypto_random_bytes},
      {"nonce", crypto_nonce},
      {"aes_cbc_encrypt", crypto_aes_cbc_encrypt},
      {"aes_cbc_decrypt", crypto_aes_cbc_decrypt},
      {"aes_ecb_encrypt", crypto_aes_ecb_encrypt},
      {"aes_ecb_decrypt", crypto_aes_ecb_decrypt},
      {"aes_gcm_encrypt", crypto_aes_gcm_encrypt},
      {"aes_gcm_decrypt", crypto_aes_gcm_decrypt},
      {NULL, NULL},
  };
  push_algs(L);
  int algs = lua_gettop(L);
  lua_createtable(L, 0, 40);
  lua_pushvalue(L, algs);
  luaL_openlib(L, NULL, fns, 1);
  static const struct {
    const char *name;
    int which;
  } mds[] = {{"md5", MD_MD5}, {"sha1", MD_SHA1}, {"sha256", MD_SHA256}};
  char name[32];
  for (size_t i = 0; i < sizeof mds / sizeof mds[0]; i++) {
    set_md_fn(L, algs, mds[i].name, crypto_digest, mds[i].which, 0);
    snprintf(name, sizeof name, "%s_hex", mds[i].name);
    set_md_fn(L, algs, name, crypto_digest, mds[i].which, 1);
    if (mds[i].which == MD_MD5) continue;
    snprintf(name, sizeof name, "hmac_%s", mds[i].name);
    set_md_fn(L, algs, name, crypto_hmac, mds[i].which, 0);
    snprintf(name, sizeof name, "hmac_%s_hex", mds[i].name);
    set_md_fn(L, algs, name, crypto_hmac, mds[i].which, 1);
  }
  wxd__crypto_open_rsa(L);
  wxd__crypto_open_ecdsa(L);
  wxd__crypto_open_wxmsg(L, algs);
  lua_remove(L, algs);
  return 1;
}
