/* crypto: digests, MACs, encodings, randomness, AES and RSA on OpenSSL 3.
 *
 * Lua sees this as the native module `wxd.core.crypto`; lua/wxd/crypto.lua
 * puts friendly names and defaults on top, and docs/crypto.md is the
 * contract of every function. Only EVP interfaces of OpenSSL 3 are used.
 *
 * Rules every function here follows:
 *  - Expected failures (a bad signature, a wrong tag, bad padding, corrupted
 *    base64, garbage PEM) return an error; programmer errors (a key of the
 *    wrong length, an argument of the wrong type) raise in Lua.
 *  - Every decryption failure of AES-CBC, AES-ECB, AES-GCM and RSA-OAEP gives
 *    the same error ("decrypt failed") after the same work: no oracle.
 *  - No error message carries key material, plaintext or passphrases.
 *  - Buffers that held keys or plaintext are cleansed before they are freed.
 *  - No global mutable state: algorithm objects are fetched per Lua state.
 *
 * The plain C functions below take buffers and never touch Lua, so that
 * other core files and the fuzz targets in spec/fuzz/ can call them.
 */
#ifndef WXD_CRYPTO_H
#define WXD_CRYPTO_H

#include <lua.h>
#include <stddef.h>

/* Largest decoded size of `len` base64 characters (an upper bound). */
#define WXD_BASE64_DECODED_MAX(len) ((len) / 4 * 3 + 3)
/* Exact encoded size of `len` bytes with padding. */
#define WXD_BASE64_ENCODED_LEN(len) (((len) + 2) / 3 * 4)

/* Alphabets, and a flag of wxd_base64_decode's mode. */
enum { WXD_BASE64_STD = 0, WXD_BASE64_URL = 1, WXD_BASE64_ANY_TAIL = 2 };

/* Encodes in[0..len) into out (WXD_BASE64_ENCODED_LEN(len) bytes at most).
 * WXD_BASE64_STD always pads with '='; WXD_BASE64_URL pads only if `pad`.
 * Returns the number of characters written (no NUL is added). */
size_t wxd_base64_encode(const unsigned char *in, size_t len, char *out, int alphabet, int pad);

/* Strict decoding into out (WXD_BASE64_DECODED_MAX(len) bytes): only what
 * an encoder writes is accepted, so every byte string has one encoding.
 * Refused: any character outside the alphabet (whitespace included), '='
 * anywhere but in the last one or two places of the last quantum, a length
 * that cannot come from an encoder, and a last character whose unused low
 * bits are not zero ("QR==" is not "QQ==", RFC 4648 section 3.5).
 * `mode` is WXD_BASE64_STD (padding required) or WXD_BASE64_URL (padding
 * optional), or'ed with WXD_BASE64_ANY_TAIL to ignore those unused bits:
 * only for a WeChat EncodingAESKey, which is 43 random characters plus "=",
 * not the output of an encoder, so its last character rarely has them at 0.
 * Returns 0 and sets *outlen, or -1 (out may then hold partial bytes: the
 * caller cleanses or ignores it).
 */
int wxd_base64_decode(const char *in, size_t len, unsigned char *out, size_t *outlen, int mode);

/* Hex: encode writes 2*len characters (lower or upper case); decode accepts
 * both cases and returns -1 on an odd length or a non-hex character. */
void wxd_hex_encode(const unsigned char *in, size_t len, char *out, int upper);
int wxd_hex_decode(const char *in, size_t len, unsigned char *out);

/* PKCS#7 padding with a pad block of `block` bytes (1..255): appends
 * block - len % block bytes of that value to buf, which must have room for
 * len + block bytes. Returns the padded length. */
size_t wxd_pkcs7_pad(unsigned char *buf, size_t len, size_t block);

/* Checks the PKCS#7 padding of buf[0..len) for a pad block of `block` bytes
 * (1..255): the last byte p must be in 1..block and at most len, and the
 * last p bytes must all equal p. The check takes the same time whatever the
 * bytes are (it depends only on len and block). Returns 0 and sets *outlen
 * to len - p, or -1. */
int wxd_pkcs7_unpad(const unsigned char *buf, size_t len, size_t block, size_t *outlen);

/* 1 when a[0..alen) equals b[0..blen), in time that depends only on the
 * lengths; 0 otherwise. */
int wxd_ct_equal(const void *a, size_t alen, const void *b, size_t blen);

/* Fills buf with len bytes from a CSPRNG: OpenSSL's DRBG (RAND_bytes),
 * seeded from the kernel, one generator per thread; requests of up to 256
 * bytes are served from a per-thread block of its output (crypto.c says
 * why). Returns 0, or -1 with errno set (EIO). */
int wxd_random_bytes(void *buf, size_t len);

/* Lua module wxd.core.crypto; returns the module table. */
int wxd_open_crypto(lua_State *L);

/* Reads a PKCS#12 bundle (DER) in a private library context with the
 * legacy provider, because WeChat Pay's apiclient_cert.p12 is encrypted
 * with RC2-40, which OpenSSL 3 keeps out of the default context (loading
 * that provider process-wide would change every other user of OpenSSL).
 * The key, leaf and chain are copied into the default context; on success
 * the caller owns them. Returns 0 or one of WXD_PKCS12_* (nothing to free).
 * Used by wxd.crypto.load_pkcs12 and by the TLS client (tls.c). */
enum { WXD_PKCS12_INVALID = -1, WXD_PKCS12_BAD_PASSPHRASE = -2, WXD_PKCS12_NOMEM = -3 };
struct evp_pkey_st;
struct x509_st;
struct stack_st_X509;
int wxd_pkcs12_read(const void *der, size_t len, const char *pass, struct evp_pkey_st **key,
                    struct x509_st **leaf, struct stack_st_X509 **chain);

/* Internal to crypto.c and rsa.c: adds the RSA, certificate and PKCS#12
 * functions to the module table at the top of the stack. */
void wxd__crypto_open_rsa(lua_State *L);
/* Internal to crypto.c and ecdsa.c: adds the ECDSA P-256 (ES256) key
 * functions to the module table at the top of the stack. */
void wxd__crypto_open_ecdsa(lua_State *L);
/* Internal: argument idx as bytes; raises unless it is a string (numbers
 * are not converted) of a size EVP can take. */
const char *wxd__crypto_check_bytes(lua_State *L, int idx, size_t *len);
/* Internal to crypto.c and wxmsg.c: adds the wx_* functions (WeChat
 * message crypto) to the module table at the top; algs is the index of the
 * algorithms userdata, which they keep as upvalue 1. */
void wxd__crypto_open_wxmsg(lua_State *L, int algs);
/* Internal, for functions whose upvalue 1 is the algorithms: AES-256-CBC
 * without padding over in[0..len) into out (out == in allowed), with the
 * state's cached context. Returns the output length, or -1. */
int wxd__crypto_aes256_cbc(lua_State *L, int enc, const unsigned char *key, const unsigned char *iv,
                           const unsigned char *in, size_t len, unsigned char *out);
/* Internal, likewise: SHA-1 of data into out[20]. Returns 0 or -1. */
int wxd__crypto_sha1(lua_State *L, const void *data, size_t len, unsigned char *out);
/* Internal, likewise: SHA-256 of data into out[32]. Returns 0 or -1. */
int wxd__crypto_sha256(lua_State *L, const void *data, size_t len, unsigned char *out);

#endif
