/* wxmsg: WeChat message crypto, each step of the protocol in one native call.
 *
 * Official Account, Mini Program and WeCom callbacks sign and encrypt the
 * same way (docs/mp.md has the contract):
 *   signature     sha1, in lower-case hex, of the token, timestamp, nonce
 *                 (and, for msg_signature, the Encrypt value) sorted as byte
 *                 strings and concatenated;
 *   Encrypt       base64 of AES-256-CBC, key = the 32 bytes of
 *                 base64(EncodingAESKey "="), IV = its first 16 bytes, over
 *                 16 random bytes, the message length (4 bytes, big-endian),
 *                 the message and the receive id (appid or CorpID), padded
 *                 with PKCS#7 to a 32-byte block.
 * lua/wxd/mp.lua used to do this in several calls and Lua string work per
 * message; here each step is one call into C, with the state's scratch
 * buffer for the bytes in between (cleansed after use: it held plaintext).
 *
 * These functions are part of `wxd.core.crypto` (upvalue 1: the algorithms
 * of crypto.c), as the wx_* names:
 *   wx_signature(token, timestamp, nonce [, encrypt]) -> hex
 *   wx_verify(signature, token, timestamp, nonce [, encrypt]) -> boolean
 *       (constant-time compare)
 *   wx_decrypt(key, encrypt, receive_id) -> message | nil, "decrypt failed"
 *       (one error whatever failed: base64, padding, length, receive id)
 *   wx_encrypt(key, message, receive_id [, random]) -> Encrypt
 *   wx_seal(token, key, receive_id, message, timestamp [, fmt [, nonce
 *       [, random]]]) -> the reply envelope, XML (fmt "xml", the default)
 *       or JSON ("json"): Encrypt, MsgSignature, TimeStamp, Nonce
 *   wx_open(...), wx_open_query(...): an encrypted XML message from the
 *       request to the message table (see each below)
 * `key` is the 32-byte AES key; `random` (16 bytes) and `nonce` exist so
 * that specs can reproduce published values. Wrong argument types raise.
 */
#include "buf.h"
#include "query.h"
#include "crypto.h"
#include "xml.h"

#include <errno.h>
#include <lauxlib.h>
#include <openssl/crypto.h>
#include <stdint.h>
#include <stdio.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#define WX_FAILED "decrypt failed"
#define WX_PAD_BLOCK 32
#define WX_MAX_PART (16 * 1024 * 1024) /* a message is a few KiB; bodies are capped far below */

typedef struct part {
  const char *s;
  size_t n;
} part_t;

static const char *check_str(lua_State *L, int idx, size_t *len) {
  const char *s = wxd__crypto_check_bytes(L, idx, len);
  if (*len > WX_MAX_PART) luaL_argerror(L, idx, "too large");
  return s;
}

/* Lua's string order: bytes, then length. */
static int part_less(const part_t *a, const part_t *b) {
  size_t n = a->n < b->n ? a->n : b->n;
  int c = memcmp(a->s, b->s, n);
  return c < 0 || (c == 0 && a->n < b->n);
}

/* The signature of parts[0..n) (n is 3 or 4) into hex[40]. */
static void signature(lua_State *L, part_t *parts, int n, char hex[40]) {
  for (int i = 1; i < n; i++) /* insertion sort: four items at most */
    for (int j = i; j > 0 && part_less(&parts[j], &parts[j - 1]); j--) {
      part_t t = parts[j];
      parts[j] = parts[j - 1];
      parts[j - 1] = t;
    }
  size_t total = 0;
  for (int i = 0; i < n; i++) total += parts[i].n;
  wxd_buf_t *b = wxd_scratch(L);
  if (wxd_buf_reserve(b, total ? total : 1) != 0) luaL_error(L, "wx_signature: out of memory");
  for (int i = 0; i < n; i++) {
    memcpy(b->data + b->len, parts[i].s, parts[i].n);
    b->len += parts[i].n;
  }
  unsigned char md[20];
  int rc = wxd__crypto_sha1(L, b->data, b->len, md);
  wxd_scratch_release(b);
  if (rc != 0) luaL_error(L, "wx_signature: SHA-1 failed");
  wxd_hex_encode(md, sizeof md, hex, 0);
}

/* Arguments first..first+2 (and first+3 when present) as the parts. */
static int signature_parts(lua_State *L, int first, part_t parts[4]) {
  int n = lua_isnoneornil(L, first + 3) ? 3 : 4;
  for (int i = 0; i < n; i++) parts[i].s = check_str(L, first + i, &parts[i].n);
  return n;
}

static int wx_signature(lua_State *L) {
  part_t parts[4];
  int n = signature_parts(L, 1, parts);
  char hex[40];
  signature(L, parts, n, hex);
  lua_pushlstring(L, hex, sizeof hex);
  return 1;
}

static int wx_verify(lua_State *L) {
  size_t slen;
  const char *sig = check_str(L, 1, &slen);
  part_t parts[4];
  int n = signature_parts(L, 2, parts);
  char hex[40];
  signature(L, parts, n, hex);
  lua_pushboolean(L, wxd_ct_equal(hex, sizeof hex, sig, slen));
  return 1;
}

static const unsigned char *check_key(lua_State *L, int idx) {
  size_t n;
  const char *k = wxd__crypto_check_bytes(L, idx, &n);
  if (n != 32) luaL_argerror(L, idx, "expected the 32-byte AES key of an EncodingAESKey");
  return (const unsigned char *)k;
}

/* Decrypts the Encrypt value enc into b (reserved here); on success
 * msg and mlen point at the message inside b. 0, -1 for every failure of
 * the data, -2 out of memory (it never raises: callers may hold C memory). */
static int decrypt_into(lua_State *L, wxd_buf_t *b, const unsigned char *key, const char *enc, size_t elen,
                        const char *rid, size_t rlen, const char **msg, size_t *mlen) {
  if (wxd_buf_reserve(b, WXD_BASE64_DECODED_MAX(elen) + 16) != 0) return -2; /* out of memory */
  b->len = WXD_BASE64_DECODED_MAX(elen) + 16; /* what to cleanse */
  unsigned char *buf = (unsigned char *)b->data;
  size_t clen = 0, plen = 0;
  int ok = wxd_base64_decode(enc, elen, buf, &clen, WXD_BASE64_STD) == 0 && clen >= 32 && clen % 16 == 0;
  /* In place: EVP allows out == in exactly. */
  ok = ok && wxd__crypto_aes256_cbc(L, 0, key, key, buf, clen, buf) == (int)clen;
  ok = ok && wxd_pkcs7_unpad(buf, clen, WX_PAD_BLOCK, &plen) == 0 && plen >= 20;
  if (!ok) return -1;
  size_t n = (size_t)buf[16] << 24 | (size_t)buf[17] << 16 | (size_t)buf[18] << 8 | buf[19];
  if (n > plen - 20 || !wxd_ct_equal(buf + 20 + n, plen - 20 - n, rid, rlen)) return -1;
  *msg = (const char *)buf + 20;
  *mlen = n;
  return 0;
}

static int wx_decrypt(lua_State *L) {
  const unsigned char *key = check_key(L, 1);
  size_t elen, rlen, mlen = 0;
  const char *enc = check_str(L, 2, &elen);
  const char *rid = check_str(L, 3, &rlen);
  const char *msg = NULL;
  wxd_buf_t *b = wxd_scratch(L);
  int rc = decrypt_into(L, b, key, enc, elen, rid, rlen, &msg, &mlen);
  if (rc == -2) return luaL_error(L, "wx_decrypt: out of memory");
  int ok = rc == 0;
  if (ok) lua_pushlstring(L, msg, mlen);
  OPENSSL_cleanse(b->data, b->len);
  wxd_scratch_release(b);
  if (!ok) {
    lua_pushnil(L);
    lua_pushliteral(L, WX_FAILED);
    return 2;
  }
  return 1;
}

static const wxd_xml_node_t *child(const wxd_xml_node_t *n, const char *name) {
  for (const wxd_xml_node_t *c = n->children; c; c = c->next)
    if (strcmp(c->name, name) == 0) return c;
  return NULL;
}

static int open_fail(lua_State *L, int status, const char *fmt, const char *a, const char *b) {
  lua_pushnil(L);
  lua_pushfstring(L, fmt, a ? a : "", b ? b : "");
  lua_pushinteger(L, status);
  return 3;
}

/* Appends field(msg[name]) of wxd.mp's dedup_id, "<len>:<value>", to b:
 * 0, 1 when the value is neither a string nor absent, -2 (memory). */
static int append_field(lua_State *L, wxd_buf_t *b, int mt, const char *name) {
  lua_getfield(L, mt, name);
  size_t len = 0;
  const char *v = "";
  int t = lua_type(L, -1);
  if (t == LUA_TSTRING) v = lua_tolstring(L, -1, &len);
  int rc = 1;
  if (t == LUA_TSTRING || t == LUA_TNIL) {
    char pre[24]; /* len in decimal, then ':', written backwards */
    size_t at = sizeof pre;
    pre[--at] = ':';
    size_t x = len;
    do pre[--at] = (char)('0' + x % 10); while ((x /= 10) > 0);
    rc = wxd_buf_append(b, pre + at, sizeof pre - at) == 0 && wxd_buf_append(b, v, len) == 0 ? 0 : -2;
  }
  lua_pop(L, 1);
  return rc;
}

/* The identity under which WeChat's retries of a message are recognised
 * (the rule and its reasons are at wxd.mp's dedup_id, which this computes
 * the same way for the XML path): a message (the table at index mt) with a
 * MsgId (or MsgID) that is not an event is "m:" ..
 * sha256_hex(field(FromUserName) .. field(ToUserName) .. field(MsgId));
 * anything else "d:" .. the SHA-256 hex of the decrypted document
 * msg[0..mlen), which lives in b. A field that is not text (an array by
 * the caller's option) also gives the document's digest. Pushes the id:
 * 0, -1 (digest failed) or -2 (memory). */
static int push_dedup_id(lua_State *L, int mt, wxd_buf_t *b, const char *msg, size_t mlen) {
  unsigned char md[32];
  char id[2 + 64];
  const char *idname = "MsgId";
  lua_getfield(L, mt, idname);
  if (lua_isnil(L, -1)) idname = "MsgID";
  lua_pop(L, 1);
  lua_getfield(L, mt, idname);
  int has_id = !lua_isnil(L, -1);
  lua_pop(L, 1);
  int by_fields = 0;
  if (has_id) {
    lua_getfield(L, mt, "MsgType");
    size_t tlen = 0;
    const char *type = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &tlen) : NULL;
    by_fields = !(type && tlen == 5 && memcmp(type, "event", 5) == 0);
    lua_pop(L, 1);
  }
  if (by_fields) {
    /* The fields go after the document in b, which may move it. */
    size_t start = b->len, at = (size_t)(msg - b->data);
    int rc = append_field(L, b, mt, "FromUserName");
    if (rc == 0) rc = append_field(L, b, mt, "ToUserName");
    if (rc == 0) rc = append_field(L, b, mt, idname);
    if (rc == -2) return -2;
    if (rc == 0) {
      if (wxd__crypto_sha256(L, b->data + start, b->len - start, md) != 0) return -1;
      id[0] = 'm';
      goto done;
    }
    msg = b->data + at;
  }
  if (wxd__crypto_sha256(L, msg, mlen, md) != 0) return -1;
  id[0] = 'd';
done:
  id[1] = ':';
  wxd_hex_encode(md, sizeof md, id + 2, 0);
  lua_pushlstring(L, id, sizeof id);
  return 0;
}

/* ---- the outer document's common shape, without a tree ---- */

/* WeChat's outer document in the shape it always has (xml.h's flat
 * shape). Finds the first Encrypt child's text (*enc stays NULL without
 * one) and whether a MsgType child exists. Returns 1 for a document of
 * that shape (within the limits), else 0: the caller then parses it with
 * expat, which accepts or refuses whatever else it is (a declaration,
 * entities, a DOCTYPE, ...). What this accepts, expat reads the same way:
 * spec/01-unit/wxmsg_spec.lua compares the two. */
static int outer_scan(const char *s, size_t n, const wxd_xml_limits_t *lim, const char **enc, size_t *enclen,
                      int *compatible) {
  wxd_xml_flat_t f;
  wxd_xml_field_t field;
  *enc = NULL;
  *enclen = 0;
  *compatible = 0;
  if (!wxd_xml_flat_open(&f, s, n, lim)) return 0;
  int rc;
  while ((rc = wxd_xml_flat_next(&f, &field)) == 1) {
    if (field.name_len == 7 && memcmp(field.name, "Encrypt", 7) == 0 && !*enc) {
      *enc = field.text;
      *enclen = field.text_len;
    } else if (field.name_len == 7 && memcmp(field.name, "MsgType", 7) == 0) {
      *compatible = 1;
    }
  }
  return rc == 0;
}

/* wx_open(token, timestamp, nonce, msg_signature, body, receive_id, keys,
 *         max_bytes, max_depth, max_elements [, arrays])
 * An encrypted XML message in one call: the outer document parsed in C,
 * msg_signature checked over its Encrypt before anything is decrypted,
 * each key of the array `keys` (32-byte strings) tried, the receive id
 * checked, the message parsed. Returns msg, root, key_index, compatible
 * (the outer document has a MsgType: compatible mode), and the message's
 * dedup id (see push_dedup_id); or nil, reason,
 * status (400 or 403) as wxd.mp logs and answers them. No Lua string is
 * made of the Encrypt value or the plaintext. */
static int open_core(lua_State *L, part_t parts[4], const char *sig, size_t slen, const char *body, size_t blen,
                     const char *rid, size_t rlen, int keys, const wxd_xml_limits_t *limits, int arrays);

static int wx_open(lua_State *L) {
  part_t parts[4];
  size_t slen, blen, rlen;
  for (int i = 0; i < 3; i++) parts[i].s = check_str(L, i + 1, &parts[i].n);
  const char *sig = check_str(L, 4, &slen);
  const char *body = check_str(L, 5, &blen);
  const char *rid = check_str(L, 6, &rlen);
  luaL_checktype(L, 7, LUA_TTABLE);
  wxd_xml_limits_t lim;
  int arrays = wxd_xml_check_limits(L, 8, &lim);
  lua_settop(L, 11);
  return open_core(L, parts, sig, slen, body, blen, rid, rlen, 7, &lim, arrays);
}

/* ---- the query string, read in place ---- */

enum { Q_SIGNATURE, Q_TIMESTAMP, Q_NONCE, Q_ENCRYPT_TYPE, Q_COUNT };
static const char *const query_names[Q_COUNT] = {"msg_signature", "timestamp", "nonce", "encrypt_type"};
#define Q_VALUE_MAX 4096 /* wxd.mp's bound on each of them */

typedef struct query_value {
  const char *raw; /* NULL: absent */
  size_t raw_len;
} query_value_t;

/* Finds the four names wxd.mp reads, as parse_query(s) (last one wins,
 * nothing after max_params pairs) would give them. */
static void query_find(const char *s, size_t len, lua_Integer max_params, query_value_t v[Q_COUNT]) {
  for (int i = 0; i < Q_COUNT; i++) v[i].raw = NULL, v[i].raw_len = 0;
  lua_Integer pairs = 0;
  size_t pos = 0;
  while (pos < len) {
    const char *amp = memchr(s + pos, '&', len - pos);
    size_t stop = amp ? (size_t)(amp - s) : len;
    if (stop > pos) {
      if (++pairs > max_params) break;
      const char *pair = s + pos;
      size_t plen = stop - pos;
      const char *eq = memchr(pair, '=', plen);
      size_t klen = eq ? (size_t)(eq - pair) : plen;
      char name[16];
      /* Every name sought is under 16 bytes, and decoding shrinks a name at most 3 times. */
      if (klen > 0 && klen <= 3 * sizeof name) {
        size_t nlen = wxd_query_decode(pair, klen, name, sizeof name);
        for (int i = 0; i < Q_COUNT && nlen <= sizeof name; i++)
          if (strlen(query_names[i]) == nlen && memcmp(query_names[i], name, nlen) == 0) {
            v[i].raw = eq ? eq + 1 : pair + plen;
            v[i].raw_len = eq ? plen - klen - 1 : 0;
          }
      }
    }
    if (!amp) break;
    pos = stop + 1;
  }
}

/* wx_open_query(token, query_string, body, receive_id, keys, max_bytes,
 *               max_depth, max_elements, arrays, now, window, max_params,
 *               wecom)
 * wx_open for a request as it arrives: msg_signature, timestamp, nonce and
 * encrypt_type are read from the raw query string here, with wxd.mp's
 * checks and reasons, so that no query table and no Lua string of them is
 * made per message. Returns wx_open's results; nil, reason, status for a
 * refusal; or false when the request is not an encrypted message that
 * this path answers the way wxd.mp's general path would (encrypt_type not
 * "aes", or for WeCom present and not "aes"): the caller takes that path. */
static int wx_open_query(lua_State *L) {
  part_t parts[4];
  size_t qlen, blen, rlen;
  parts[0].s = check_str(L, 1, &parts[0].n);
  const char *query = check_str(L, 2, &qlen);
  const char *body = check_str(L, 3, &blen);
  const char *rid = check_str(L, 4, &rlen);
  luaL_checktype(L, 5, LUA_TTABLE);
  wxd_xml_limits_t lim;
  int arrays = wxd_xml_check_limits(L, 6, &lim);
  lua_Number now = luaL_checknumber(L, 10);
  int windowed = lua_isnumber(L, 11);
  lua_Number window = windowed ? lua_tonumber(L, 11) : 0;
  lua_Integer max_params = luaL_checkinteger(L, 12);
  int wecom = lua_toboolean(L, 13);
  lua_settop(L, 13);

  query_value_t v[Q_COUNT];
  query_find(query, qlen, max_params, v);
  char enc_type[4];
  size_t etlen = v[Q_ENCRYPT_TYPE].raw ? wxd_query_decode(v[Q_ENCRYPT_TYPE].raw, v[Q_ENCRYPT_TYPE].raw_len, enc_type, 4) : 0;
  int aes = v[Q_ENCRYPT_TYPE].raw && etlen == 3 && memcmp(enc_type, "aes", 3) == 0;
  if (!(aes || (wecom && !v[Q_ENCRYPT_TYPE].raw))) {
    lua_pushboolean(L, 0);
    return 1;
  }
  /* check_query's order: presence and size of each, then the timestamp's
   * form, the nonce's length, the window. */
  char sig[41], ts[12], nonce[128];
  char *const out[3] = {sig, ts, nonce};
  const size_t cap[3] = {sizeof sig, sizeof ts, sizeof nonce};
  size_t n[3];
  for (int i = 0; i < 3; i++) {
    n[i] = v[i].raw ? wxd_query_decode(v[i].raw, v[i].raw_len, out[i], cap[i]) : 0;
    if (n[i] == 0 || n[i] > Q_VALUE_MAX) return open_fail(L, 400, "missing or oversized %s%s", query_names[i], NULL);
  }
  if (n[Q_TIMESTAMP] > sizeof ts) return open_fail(L, 400, "malformed timestamp%s%s", NULL, NULL);
  lua_Number t = 0;
  for (size_t i = 0; i < n[Q_TIMESTAMP]; i++) {
    if (ts[i] < '0' || ts[i] > '9') return open_fail(L, 400, "malformed timestamp%s%s", NULL, NULL);
    t = t * 10 + (ts[i] - '0');
  }
  if (n[Q_NONCE] > sizeof nonce) return open_fail(L, 400, "nonce too long%s%s", NULL, NULL);
  if (windowed && fabs(now - t) > window) return open_fail(L, 403, "timestamp outside the window%s%s", NULL, NULL);
  parts[1].s = ts;
  parts[1].n = n[Q_TIMESTAMP];
  parts[2].s = nonce;
  parts[2].n = n[Q_NONCE];
  /* A longer signature cannot match: its first 41 bytes fail as well. */
  size_t slen = n[Q_SIGNATURE] < sizeof sig ? n[Q_SIGNATURE] : sizeof sig;
  return open_core(L, parts, sig, slen, body, blen, rid, rlen, 5, &lim, arrays);
}

/* parts[0..2]: the token, timestamp and nonce; the keys array at index
 * `keys`. */
static int open_core(lua_State *L, part_t parts[4], const char *sig, size_t slen, const char *body, size_t blen,
                     const char *rid, size_t rlen, int keys, const wxd_xml_limits_t *limits, int arrays) {
  wxd_xml_limits_t lim = *limits;
  int nkeys = (int)lua_objlen(L, keys);
  for (int i = 1; i <= nkeys; i++) { /* checked before any C allocation */
    lua_rawgeti(L, keys, i);
    check_key(L, -1);
    lua_pop(L, 1);
  }

  wxd_buf_t *b = wxd_scratch(L);
  /* From here to the free of `outer`, nothing may raise. */
  wxd_xml_doc_t *outer = NULL;
  const char *enc = NULL;
  size_t enclen = 0;
  int compatible = 0;
  if (!outer_scan(body, blen, &lim, &enc, &enclen, &compatible)) {
    wxd_xml_error_t err;
    int rc = wxd_xml_parse(body, blen, &lim, &outer, &err);
    if (rc != WXD_XML_OK) {
      char detail[160];
      if (err.line) snprintf(detail, sizeof detail, "line %lu, column %lu: %s", err.line, err.column, err.detail);
      else snprintf(detail, sizeof detail, "%s", err.detail ? err.detail : wxd_xml_strerror(rc));
      wxd_scratch_release(b);
      return open_fail(L, 400, "%s (%s)", wxd_xml_strerror(rc), detail);
    }
    const wxd_xml_node_t *root = wxd_xml_root(outer);
    const wxd_xml_node_t *node = child(root, "Encrypt");
    if (node && node->text) {
      enc = node->text;
      enclen = node->text_len;
    }
    compatible = child(root, "MsgType") != NULL;
  }
  if (!enc || enclen == 0) {
    if (outer) wxd_xml_free(outer);
    wxd_scratch_release(b);
    return open_fail(L, 400, "no Encrypt field%s%s", NULL, NULL);
  }
  parts[3].s = enc;
  parts[3].n = enclen;
  for (int i = 1; i < 4; i++)
    for (int j = i; j > 0 && part_less(&parts[j], &parts[j - 1]); j--) {
      part_t t = parts[j];
      parts[j] = parts[j - 1];
      parts[j - 1] = t;
    }
  size_t total = parts[0].n + parts[1].n + parts[2].n + parts[3].n;
  int ok = wxd_buf_reserve(b, total) == 0;
  if (ok) {
    for (int i = 0; i < 4; i++) {
      memcpy(b->data + b->len, parts[i].s, parts[i].n);
      b->len += parts[i].n;
    }
    unsigned char md1[20];
    char hex[40];
    ok = wxd__crypto_sha1(L, b->data, b->len, md1) == 0;
    if (ok) {
      wxd_hex_encode(md1, sizeof md1, hex, 0);
      ok = wxd_ct_equal(hex, sizeof hex, sig, slen);
    }
    b->len = 0;
  }
  if (!ok) {
    if (outer) wxd_xml_free(outer);
    wxd_scratch_release(b);
    return open_fail(L, 403, "bad msg_signature%s%s", NULL, NULL);
  }
  const char *msg = NULL;
  size_t mlen = 0;
  int used = 0, oom = 0;
  for (int i = 1; i <= nkeys && !used && !oom; i++) {
    lua_rawgeti(L, keys, i); /* a string of the table: anchored by it */
    const unsigned char *key = (const unsigned char *)lua_tostring(L, -1);
    lua_pop(L, 1);
    int drc = decrypt_into(L, b, key, enc, enclen, rid, rlen, &msg, &mlen);
    if (drc == 0) used = i;
    oom = drc == -2;
  }
  if (outer) wxd_xml_free(outer);
  if (oom) {
    wxd_scratch_release(b);
    return luaL_error(L, "wx_open: out of memory");
  }
  if (!used) {
    OPENSSL_cleanse(b->data, b->len);
    wxd_scratch_release(b);
    return open_fail(L, 400, "decrypt failed%s%s", NULL, NULL);
  }
  int n = wxd_xml_decode_push(L, msg, mlen, &lim, arrays);
  if (n == 3) { /* nil, err, detail */
    OPENSSL_cleanse(b->data, b->len);
    wxd_scratch_release(b);
    const char *e = lua_tostring(L, -2), *d = lua_tostring(L, -1);
    lua_pushfstring(L, "decrypted message: %s (%s)", e, d);
    lua_replace(L, -3);
    lua_pushinteger(L, 400);
    lua_replace(L, -2);
    return 3;
  }
  int idrc = push_dedup_id(L, lua_gettop(L) - 1, b, msg, mlen);
  OPENSSL_cleanse(b->data, b->len);
  wxd_scratch_release(b);
  if (idrc != 0) return luaL_error(L, "wx_open: %s", idrc == -2 ? "out of memory" : "SHA-256 failed");
  lua_pushinteger(L, used);
  lua_insert(L, -2);
  lua_pushboolean(L, compatible);
  lua_insert(L, -2);
  return 5;
}

/* Encrypts into the scratch buffer b: on return b->data[0..*b64len) is the
 * Encrypt value (b holds the plaintext's bytes after it until cleansed). */
static void encrypt_into(lua_State *L, wxd_buf_t *b, const unsigned char *key, const char *msg, size_t mlen,
                         const char *rid, size_t rlen, const char *random, size_t *b64len) {
  size_t plain = 20 + mlen + rlen;
  size_t padded = plain + WX_PAD_BLOCK - plain % WX_PAD_BLOCK;
  size_t enclen = WXD_BASE64_ENCODED_LEN(padded);
  if (wxd_buf_reserve(b, enclen + padded + WX_PAD_BLOCK) != 0) luaL_error(L, "wx_encrypt: out of memory");
  /* The base64 text goes first, the plaintext (then ciphertext) after it. */
  unsigned char *p = (unsigned char *)b->data + enclen;
  if (random) {
    memcpy(p, random, 16);
  } else if (wxd_random_bytes(p, 16) != 0) {
    luaL_error(L, "wx_encrypt: getrandom failed (errno %d)", errno);
  }
  p[16] = (unsigned char)(mlen >> 24);
  p[17] = (unsigned char)(mlen >> 16);
  p[18] = (unsigned char)(mlen >> 8);
  p[19] = (unsigned char)mlen;
  memcpy(p + 20, msg, mlen);
  memcpy(p + 20 + mlen, rid, rlen);
  size_t n = wxd_pkcs7_pad(p, plain, WX_PAD_BLOCK);
  b->len = enclen + n; /* what to cleanse */
  if (wxd__crypto_aes256_cbc(L, 1, key, key, p, n, p) != (int)n) {
    OPENSSL_cleanse(b->data, b->len);
    luaL_error(L, "wx_encrypt: AES failed");
  }
  *b64len = wxd_base64_encode(p, n, b->data, WXD_BASE64_STD, 1);
}

static const char *opt_fixed(lua_State *L, int idx, size_t want, const char *what) {
  if (lua_isnoneornil(L, idx)) return NULL;
  size_t n;
  const char *s = wxd__crypto_check_bytes(L, idx, &n);
  if (n != want) luaL_argerror(L, idx, what);
  return s;
}

static int wx_encrypt(lua_State *L) {
  const unsigned char *key = check_key(L, 1);
  size_t mlen, rlen, n;
  const char *msg = check_str(L, 2, &mlen);
  const char *rid = check_str(L, 3, &rlen);
  const char *random = opt_fixed(L, 4, 16, "random must be 16 bytes");
  wxd_buf_t *b = wxd_scratch(L);
  encrypt_into(L, b, key, msg, mlen, rid, rlen, random, &n);
  lua_pushlstring(L, b->data, n);
  OPENSSL_cleanse(b->data, b->len);
  wxd_scratch_release(b);
  return 1;
}

static int wx_seal(lua_State *L) {
  size_t tlen, mlen, rlen, nlen = 16, enclen;
  const char *token = check_str(L, 1, &tlen);
  const unsigned char *key = check_key(L, 2);
  const char *rid = check_str(L, 3, &rlen);
  const char *msg = check_str(L, 4, &mlen);
  lua_Number tsn = luaL_checknumber(L, 5);
  luaL_argcheck(L, tsn >= 0 && tsn < 1e12 && tsn == (lua_Number)(int64_t)tsn, 5, "timestamp must be whole seconds");
  const char *fmt = luaL_optstring(L, 6, "xml");
  int json = strcmp(fmt, "json") == 0;
  luaL_argcheck(L, json || strcmp(fmt, "xml") == 0, 6, "fmt must be \"xml\" or \"json\"");
  char nonce[64];
  if (!lua_isnoneornil(L, 7)) {
    const char *given = check_str(L, 7, &nlen);
    luaL_argcheck(L, nlen >= 1 && nlen <= 32, 7, "nonce must be 1 to 32 characters");
    for (size_t i = 0; i < nlen; i++)
      luaL_argcheck(L, (given[i] >= '0' && given[i] <= '9') || (given[i] >= 'a' && given[i] <= 'z') ||
                       (given[i] >= 'A' && given[i] <= 'Z'), 7, "nonce must be letters and digits");
    memcpy(nonce, given, nlen);
  } else {
    static const char alnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char rnd[48];
    size_t got = 0;
    while (got < nlen) {
      if (wxd_random_bytes(rnd, sizeof rnd) != 0) return luaL_error(L, "wx_seal: getrandom failed (errno %d)", errno);
      for (size_t i = 0; i < sizeof rnd && got < nlen; i++) /* no modulo bias: 248 = 4 * 62 */
        if (rnd[i] < 248) nonce[got++] = alnum[rnd[i] % 62];
    }
  }
  const char *random = opt_fixed(L, 8, 16, "random must be 16 bytes");
  char ts[24];
  int tslen = snprintf(ts, sizeof ts, "%lld", (long long)tsn);

  wxd_buf_t *b = wxd_scratch(L);
  encrypt_into(L, b, key, msg, mlen, rid, rlen, random, &enclen);
  /* Room for the concatenation to sign and the document, after the
   * plaintext; reserved before any pointer into b is taken (it may move). */
  size_t total = tlen + (size_t)tslen + nlen + enclen;
  size_t doc_cap = enclen + 256;
  size_t at = b->len;
  if (wxd_buf_reserve(b, total + doc_cap) != 0) {
    OPENSSL_cleanse(b->data, b->len);
    return luaL_error(L, "wx_seal: out of memory");
  }
  part_t parts[4] = {{token, tlen}, {ts, (size_t)tslen}, {nonce, nlen}, {b->data, enclen}};
  for (int i = 1; i < 4; i++)
    for (int j = i; j > 0 && part_less(&parts[j], &parts[j - 1]); j--) {
      part_t t = parts[j];
      parts[j] = parts[j - 1];
      parts[j - 1] = t;
    }
  char *cat = b->data + at;
  size_t off = 0;
  for (int i = 0; i < 4; i++) {
    memcpy(cat + off, parts[i].s, parts[i].n);
    off += parts[i].n;
  }
  unsigned char md[20];
  char hex[40];
  if (wxd__crypto_sha1(L, cat, off, md) != 0) {
    OPENSSL_cleanse(b->data, b->len);
    return luaL_error(L, "wx_seal: SHA-1 failed");
  }
  wxd_hex_encode(md, sizeof md, hex, 0);
  char *doc = cat + off;
  /* The envelope, piece by piece (no printf per message). doc_cap covers
   * the Encrypt value plus the fixed parts, the signature, timestamp and
   * nonce (at most 40 + 23 + 32 bytes). */
#define LIT(s) {s, sizeof s - 1}
  const part_t xml_parts[] = {LIT("<xml><Encrypt><![CDATA["),
                              {b->data, enclen},
                              LIT("]]></Encrypt><MsgSignature><![CDATA["),
                              {hex, sizeof hex},
                              LIT("]]></MsgSignature><TimeStamp>"),
                              {ts, (size_t)tslen},
                              LIT("</TimeStamp><Nonce><![CDATA["),
                              {nonce, nlen},
                              LIT("]]></Nonce></xml>")};
  const part_t json_parts[] = {LIT("{\"Encrypt\":\""),  {b->data, enclen}, LIT("\",\"MsgSignature\":\""),
                               {hex, sizeof hex},        LIT("\",\"TimeStamp\":"), {ts, (size_t)tslen},
                               LIT(",\"Nonce\":\""),      {nonce, nlen},     LIT("\"}")};
#undef LIT
  const part_t *pp = json ? json_parts : xml_parts;
  size_t n = 0;
  for (int i = 0; i < 9; i++) {
    if (n + pp[i].n >= doc_cap) {
      n = doc_cap;
      break;
    }
    memcpy(doc + n, pp[i].s, pp[i].n);
    n += pp[i].n;
  }
  if (n < doc_cap) lua_pushlstring(L, doc, n);
  OPENSSL_cleanse(b->data, at); /* the plaintext; the rest is public */
  wxd_scratch_release(b);
  if (n >= doc_cap) return luaL_error(L, "wx_seal: document too large");
  return 1;
}

void wxd__crypto_open_wxmsg(lua_State *L, int algs) {
  static const luaL_Reg fns[] = {
      {"wx_signature", wx_signature}, {"wx_verify", wx_verify}, {"wx_decrypt", wx_decrypt},
      {"wx_encrypt", wx_encrypt},     {"wx_seal", wx_seal},     {"wx_open", wx_open},
      {"wx_open_query", wx_open_query}, {NULL, NULL},
  };
  for (const luaL_Reg *f = fns; f->name; f++) {
    lua_pushvalue(L, algs);
    lua_pushcclosure(L, f->func, 1);
    lua_setfield(L, -2, f->name);
  }
}
