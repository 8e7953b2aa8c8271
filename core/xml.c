/* xml: see xml.h. */
#include "xml.h"

#include "buf.h"

#include <ctype.h>
#include <expat.h>
#include <lauxlib.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ---- the document: an arena of chunks ---- */

typedef struct arena_chunk {
  struct arena_chunk *next;
  size_t used, cap;
  max_align_t data[]; /* aligned for any node */
} arena_chunk_t;

struct wxd_xml_doc {
  arena_chunk_t *chunks; /* newest first */
  wxd_xml_node_t *root;
};

#define ARENA_CHUNK 8192

static void *arena_alloc(wxd_xml_doc_t *doc, size_t n) {
  n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
  arena_chunk_t *c = doc->chunks;
  if (!c || c->cap - c->used < n) {
    size_t cap = n > ARENA_CHUNK ? n : ARENA_CHUNK;
    c = malloc(sizeof *c + cap);
    if (!c) return NULL;
    c->used = 0;
    c->cap = cap;
    c->next = doc->chunks;
    doc->chunks = c;
  }
  void *p = (char *)c->data + c->used;
  c->used += n;
  return p;
}

static char *arena_strdup(wxd_xml_doc_t *doc, const char *s, size_t len) {
  char *p = arena_alloc(doc, len + 1);
  if (!p) return NULL;
  if (len) memcpy(p, s, len);
  p[len] = 0;
  return p;
}

void wxd_xml_free(wxd_xml_doc_t *doc) {
  if (!doc) return;
  arena_chunk_t *c = doc->chunks;
  while (c) {
    arena_chunk_t *next = c->next;
    free(c);
    c = next;
  }
  free(doc);
}

const wxd_xml_node_t *wxd_xml_root(const wxd_xml_doc_t *doc) { return doc->root; }

const char *wxd_xml_strerror(int code) {
  switch (code) {
  case WXD_XML_OK: return "ok";
  case WXD_XML_EDOCTYPE: return "doctype not allowed";
  case WXD_XML_ETOOLARGE: return "too large";
  case WXD_XML_ETOODEEP: return "too deep";
  case WXD_XML_ETOOMANY: return "too many elements";
  case WXD_XML_ENOMEM: return "out of memory";
  default: return "invalid xml";
  }
}

/* ---- the parse ---- */

typedef struct parse_ctx {
  XML_Parser p;
  wxd_xml_doc_t *doc;
  const wxd_xml_limits_t *lim;
  wxd_xml_node_t **stack; /* open elements; stack[1] is the root */
  unsigned depth;
  size_t elements;
  char *text;             /* character data of the innermost open element */
  size_t text_len, text_cap;
  int code;               /* first failure seen by a handler */
  wxd_xml_error_t err;
} parse_ctx_t;

/* Records the first failure and stops expat for good. */
static void parse_fail(parse_ctx_t *c, int code, const char *detail) {
  if (c->code != WXD_XML_OK) return;
  c->code = code;
  c->err.line = (unsigned long)XML_GetCurrentLineNumber(c->p);
  c->err.column = (unsigned long)XML_GetCurrentColumnNumber(c->p);
  c->err.detail = detail;
  XML_StopParser(c->p, XML_FALSE);
}

static void XMLCALL on_start(void *ud, const XML_Char *name, const XML_Char **atts) {
  (void)atts;
  parse_ctx_t *c = ud;
  if (c->code != WXD_XML_OK) return;
  if (c->depth + 1 > c->lim->max_depth) {
    parse_fail(c, WXD_XML_ETOODEEP, "nesting deeper than the limit");
    return;
  }
  if (c->elements + 1 > c->lim->max_elements) {
    parse_fail(c, WXD_XML_ETOOMANY, "more elements than the limit");
    return;
  }
  wxd_xml_node_t *n = arena_alloc(c->doc, sizeof *n);
  char *nm = n ? arena_strdup(c->doc, name, strlen(name)) : NULL;
  if (!nm) {
    parse_fail(c, WXD_XML_ENOMEM, "out of memory");
    return;
  }
  memset(n, 0, sizeof *n);
  n->name = nm;
  if (c->depth == 0) {
    c->doc->root = n;
  } else {
    wxd_xml_node_t *parent = c->stack[c->depth];
    if (parent->last) parent->last->next = n;
    else parent->children = n;
    parent->last = n;
  }
  c->elements++;
  c->stack[++c->depth] = n;
  c->text_len = 0; /* the parent's text, if any, is dropped: it has a child */
}

static void XMLCALL on_end(void *ud, const XML_Char *name) {
  (void)name;
  parse_ctx_t *c = ud;
  if (c->code != WXD_XML_OK || c->depth == 0) return;
  wxd_xml_node_t *n = c->stack[c->depth];
  if (!n->children) {
    char *t = arena_strdup(c->doc, c->text ? c->text : "", c->text_len);
    if (!t) {
      parse_fail(c, WXD_XML_ENOMEM, "out of memory");
      return;
    }
    n->text = t;
    n->text_len = c->text_len;
  }
  c->depth--;
  c->text_len = 0;
}

static void XMLCALL on_text(void *ud, const XML_Char *s, int len) {
  parse_ctx_t *c = ud;
  if (c->code != WXD_XML_OK || c->depth == 0 || len <= 0) return;
  if (c->stack[c->depth]->children) return; /* mixed content: only leaves keep text */
  size_t need = c->text_len + (size_t)len;
  if (need > c->text_cap) {
    size_t cap = c->text_cap ? c->text_cap : 256;
    while (cap < need) cap *= 2;
    char *t = realloc(c->text, cap);
    if (!t) {
      parse_fail(c, WXD_XML_ENOMEM, "out of memory");
      return;
    }
    c->text = t;
    c->text_cap = cap;
  }
  memcpy(c->text + c->text_len, s, (size_t)len);
  c->text_len = need;
}

/* A DOCTYPE of any kind ends the parse before its first declaration is
 * read: no entity can ever be defined, internal or external. */
static void XMLCALL on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid, const XML_Char *pubid,
                               int has_internal_subset) {
  (void)name, (void)sysid, (void)pubid, (void)has_internal_subset;
  parse_fail(ud, WXD_XML_EDOCTYPE, "DOCTYPE is not allowed");
}

static void XMLCALL on_entity_decl(void *ud, const XML_Char *name, int is_param, const XML_Char *value,
                                   int value_len, const XML_Char *base, const XML_Char *sysid,
                                   const XML_Char *pubid, const XML_Char *notation) {
  (void)name, (void)is_param, (void)value, (void)value_len, (void)base, (void)sysid, (void)pubid, (void)notation;
  parse_fail(ud, WXD_XML_EDOCTYPE, "entity declarations are not allowed");
}

/* Unreachable without a DOCTYPE; refused anyway (defence in depth). */
static int XMLCALL on_external_entity(XML_Parser p, const XML_Char *context, const XML_Char *base,
                                      const XML_Char *sysid, const XML_Char *pubid) {
  (void)context, (void)base, (void)sysid, (void)pubid;
  parse_fail(XML_GetUserData(p), WXD_XML_EDOCTYPE, "external entities are not allowed");
  return XML_STATUS_ERROR;
}

static void XMLCALL on_skipped_entity(void *ud, const XML_Char *name, int is_param) {
  (void)name, (void)is_param;
  parse_fail(ud, WXD_XML_EDOCTYPE, "entities are not allowed");
}

/* Expat salts its hash tables (against hash flooding) with bytes it asks
 * the kernel for on every parser, unless given a salt: two system calls
 * per message on the hot path. Each thread draws one seed from the kernel
 * and derives a fresh salt per parser from it (splitmix64): unpredictable
 * from outside, as the salts are never shown. Per thread, so unshared. */
static unsigned long next_salt(void) {
  static _Thread_local uint64_t state;
  static _Thread_local int seeded;
  if (!seeded) {
    if (getrandom(&state, sizeof state, 0) != (ssize_t)sizeof state) state = (uint64_t)(uintptr_t)&state ^ (uint64_t)time(NULL);
    seeded = 1;
  }
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (unsigned long)(z ^ (z >> 31));
}

/* What a parse needs besides the document, kept per thread between
 * parses: an expat parser (reset, not re-created: creating one is several
 * allocations and an environment lookup), the open-element stack and the
 * text buffer. A WeChat message is two parses; in steady state they
 * allocate only the document. Freed when the thread exits (a pthread key's
 * destructor), so each worker owns its own and nothing is shared. */
typedef struct parse_cache {
  XML_Parser p;
  wxd_xml_node_t **stack;
  size_t stack_cap;
  char *text;
  size_t text_cap;
} parse_cache_t;

/* Buffers above this are not kept for the next parse. */
#define CACHE_KEEP (64 * 1024)

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;
static int cache_key_ok;

static void cache_free(void *v) {
  parse_cache_t *pc = v;
  if (!pc) return;
  if (pc->p) XML_ParserFree(pc->p);
  free(pc->stack);
  free(pc->text);
  free(pc);
}

static void cache_key_init(void) { cache_key_ok = pthread_key_create(&cache_key, cache_free) == 0; }

/* This thread's cache, or NULL (out of memory: the parse makes its own). */
static parse_cache_t *cache_get(void) {
  pthread_once(&cache_once, cache_key_init);
  if (!cache_key_ok) return NULL;
  parse_cache_t *pc = pthread_getspecific(cache_key);
  if (!pc) {
    pc = calloc(1, sizeof *pc);
    if (pc && pthread_setspecific(cache_key, pc) != 0) {
      free(pc);
      pc = NULL;
    }
  }
  return pc;
}

/* A parser ready for a new document: the cached one reset, else a new one. */
static XML_Parser parser_take(parse_cache_t *pc) {
  XML_Parser p = NULL;
  if (pc && pc->p) {
    p = pc->p;
    pc->p = NULL;
    if (!XML_ParserReset(p, NULL)) {
      XML_ParserFree(p);
      p = NULL;
    }
  }
  return p ? p : XML_ParserCreate(NULL);
}

int wxd_xml_parse(const char *buf, size_t len, const wxd_xml_limits_t *lim, wxd_xml_doc_t **out,
                  wxd_xml_error_t *err) {
  wxd_xml_error_t dummy;
  if (!err) err = &dummy;
  memset(err, 0, sizeof *err);
  *out = NULL;
  if (len > lim->max_bytes || len > (size_t)INT_MAX) {
    err->detail = "input larger than the limit";
    return WXD_XML_ETOOLARGE;
  }
  parse_ctx_t c;
  memset(&c, 0, sizeof c);
  c.lim = lim;
  parse_cache_t *pc = cache_get();
  size_t depth_cap = (size_t)lim->max_depth + 1;
  c.doc = calloc(1, sizeof *c.doc);
  if (pc && pc->stack_cap >= depth_cap) {
    c.stack = pc->stack; /* taken from the cache while in use */
    pc->stack = NULL;
  } else {
    c.stack = calloc(depth_cap, sizeof *c.stack);
  }
  if (pc) {
    c.text = pc->text;
    c.text_cap = pc->text_cap;
    pc->text = NULL;
    pc->text_cap = 0;
  }
  c.p = parser_take(pc);
  if (c.p) XML_SetHashSalt(c.p, next_salt());
  int code = WXD_XML_OK;
  if (!c.doc || !c.stack || !c.p) {
    err->detail = "out of memory";
    code = WXD_XML_ENOMEM;
    goto done;
  }
  XML_SetUserData(c.p, &c);
  XML_SetElementHandler(c.p, on_start, on_end);
  XML_SetCharacterDataHandler(c.p, on_text);
  XML_SetStartDoctypeDeclHandler(c.p, on_doctype);
  XML_SetEntityDeclHandler(c.p, on_entity_decl);
  XML_SetExternalEntityRefHandler(c.p, on_external_entity);
  XML_SetSkippedEntityHandler(c.p, on_skipped_entity);
  XML_SetParamEntityParsing(c.p, XML_PARAM_ENTITY_PARSING_NEVER);

  if (XML_Parse(c.p, buf, (int)len, XML_TRUE) != XML_STATUS_OK || c.code != WXD_XML_OK) {
    if (c.code != WXD_XML_OK) {
      code = c.code;
      *err = c.err;
    } else {
      enum XML_Error e = XML_GetErrorCode(c.p);
      code = e == XML_ERROR_NO_MEMORY ? WXD_XML_ENOMEM : WXD_XML_EINVALID;
      err->line = (unsigned long)XML_GetCurrentLineNumber(c.p);
      err->column = (unsigned long)XML_GetCurrentColumnNumber(c.p);
      err->detail = XML_ErrorString(e);
    }
  } else if (!c.doc->root) {
    code = WXD_XML_EINVALID; /* expat reports this itself; kept as a guard */
    err->detail = "no element found";
  }

done:
  if (pc && !pc->p && c.p) pc->p = c.p;
  else if (c.p) XML_ParserFree(c.p);
  if (pc && c.stack && depth_cap * sizeof *c.stack <= CACHE_KEEP &&
      (!pc->stack || pc->stack_cap < depth_cap)) {
    free(pc->stack);
    pc->stack = c.stack;
    pc->stack_cap = depth_cap;
  } else {
    free(c.stack);
  }
  if (pc && c.text && c.text_cap <= CACHE_KEEP && !pc->text) {
    pc->text = c.text;
    pc->text_cap = c.text_cap;
  } else {
    free(c.text);
  }
  if (code != WXD_XML_OK) {
    wxd_xml_free(c.doc);
    return code;
  }
  *out = c.doc;
  return WXD_XML_OK;
}

/* ---- the flat shape, without expat ---- */

static int flat_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static int flat_name_start(unsigned char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_'; }

static int flat_name_char(unsigned char c) { return flat_name_start(c) || (c >= '0' && c <= '9'); }

/* The length of the strict UTF-8 sequence of one XML character (not
 * ASCII) at p[0..n), or 0: no overlong forms, no surrogates, nothing above
 * U+10FFFF, not U+FFFE or U+FFFF (not XML characters). */
static size_t flat_utf8(const unsigned char *p, size_t n) {
  unsigned char c = p[0];
  if (c >= 0xc2 && c <= 0xdf) return n >= 2 && (p[1] & 0xc0) == 0x80 ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    if (n < 3 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80) return 0;
    if (c == 0xe0 && p[1] < 0xa0) return 0;                   /* overlong */
    if (c == 0xed && p[1] >= 0xa0) return 0;                  /* surrogates */
    if (c == 0xef && p[1] == 0xbf && p[2] >= 0xbe) return 0; /* U+FFFE, U+FFFF */
    return 3;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    if (n < 4 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80) return 0;
    if (c == 0xf0 && p[1] < 0x90) return 0; /* overlong */
    if (c == 0xf4 && p[1] >= 0x90) return 0; /* above U+10FFFF */
    return 4;
  }
  return 0;
}

/* How many bytes from p[0..n) are text that expat passes through as is:
 * XML characters without CR (line ends are normalised), and in plain text
 * (cdata 0) without white space, '<', '&', '>' or ']'. */
static size_t flat_text(const unsigned char *p, size_t n, int cdata) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      if (cdata ? c < 0x20 && c != '\t' && c != '\n'
                : c <= 0x20 || c == '<' || c == '&' || c == '>' || c == ']')
        break;
      i++;
    } else {
      size_t k = flat_utf8(p + i, n - i);
      if (!k) break;
      i += k;
    }
  }
  return i;
}

int wxd_xml_flat_open(wxd_xml_flat_t *f, const char *s, size_t n, const wxd_xml_limits_t *lim) {
  f->s = s;
  f->n = n;
  f->at = 5;
  f->elements = 1;
  f->max_elements = lim->max_elements;
  return n <= lim->max_bytes && n <= (size_t)INT_MAX && lim->max_depth >= 2 && lim->max_elements >= 1 &&
         n >= 11 && memcmp(s, "<xml>", 5) == 0;
}

int wxd_xml_flat_next(wxd_xml_flat_t *f, wxd_xml_field_t *field) {
  static const char cdata_open[] = "<![CDATA[";
  const size_t copen = sizeof cdata_open - 1;
  const char *s = f->s;
  size_t n = f->n, i = f->at;
  while (i < n && flat_ws((unsigned char)s[i])) i++;
  if (n - i >= 6 && memcmp(s + i, "</xml>", 6) == 0) {
    for (i += 6; i < n; i++)
      if (!flat_ws((unsigned char)s[i])) return -1;
    f->at = n;
    return 0;
  }
  if (n - i < 2 || s[i] != '<' || !flat_name_start((unsigned char)s[i + 1])) return -1;
  size_t name = ++i;
  while (i < n && flat_name_char((unsigned char)s[i])) i++;
  size_t nlen = i - name;
  if (i >= n || s[i] != '>') return -1;
  if (++f->elements > f->max_elements) return -1;
  i++;
  const char *text;
  size_t tlen;
  if (n - i > copen && memcmp(s + i, cdata_open, copen) == 0) {
    text = s + i + copen;
    const char *end = memmem(text, n - (i + copen), "]]>", 3);
    if (!end) return -1;
    tlen = (size_t)(end - text);
    if (flat_text((const unsigned char *)text, tlen, 1) != tlen) return -1;
    i = (size_t)(end - s) + 3;
  } else {
    text = s + i;
    tlen = flat_text((const unsigned char *)text, n - i, 0);
    if (tlen == 0) return -1;
    i += tlen;
  }
  /* The end tag of the same element. */
  if (n - i < nlen + 3 || s[i] != '<' || s[i + 1] != '/' || memcmp(s + i + 2, s + name, nlen) != 0 ||
      s[i + 2 + nlen] != '>')
    return -1;
  f->at = i + nlen + 3;
  field->name = s + name;
  field->name_len = nlen;
  field->text = text;
  field->text_len = tlen;
  return 1;
}

/* ---- Lua ---- */

#define DOC_MT "wxd.xml.doc"

/* A parsed document is held by a box (a userdata whose __gc frees it)
 * until its tables are built, so that a raise while they are built (out of
 * memory) cannot leak it. One box per state, kept in the registry between
 * parses: a userdata with a finalizer per message costs LuaJIT's collector
 * far more than the box itself (each is separated and finalized). A box in
 * use is taken out of the registry and anchored on the stack: a parse that
 * starts meanwhile (Lua run by a finalizer) makes its own, and a box that a
 * raise left holding a document is never reused: the collector frees it. */
typedef struct doc_box {
  wxd_xml_doc_t *doc;
} doc_box_t;

static const char box_key = 0; /* its address is the box's registry key */

static int doc_gc(lua_State *L) {
  doc_box_t *box = luaL_checkudata(L, 1, DOC_MT);
  wxd_xml_free(box->doc);
  box->doc = NULL;
  return 0;
}

/* Pushes this state's box, taken out of the registry, or a new one. */
static doc_box_t *box_take(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&box_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  doc_box_t *box = lua_touserdata(L, -1);
  if (box) {
    lua_pushlightuserdata(L, (void *)&box_key);
    lua_pushnil(L);
    lua_rawset(L, LUA_REGISTRYINDEX);
    return box;
  }
  lua_pop(L, 1);
  box = lua_newuserdata(L, sizeof *box);
  box->doc = NULL;
  luaL_getmetatable(L, DOC_MT);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    luaL_newmetatable(L, DOC_MT);
    lua_pushcfunction(L, doc_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return box;
}

/* Puts the (empty) box at idx back for the next parse. */
static void box_put_back(lua_State *L, int idx) {
  lua_pushlightuserdata(L, (void *)&box_key);
  lua_pushvalue(L, idx);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

static void push_element(lua_State *L, const wxd_xml_node_t *n, int arrays);

static void push_value(lua_State *L, const wxd_xml_node_t *n, int arrays) {
  if (n->children) push_element(L, n, arrays);
  else lua_pushlstring(L, n->text, n->text_len);
}

/* Pushes the table of an element with children: each child's name maps to
 * its value; a name seen twice, or listed in `arrays`, maps to an array. */
static void push_element(lua_State *L, const wxd_xml_node_t *n, int arrays) {
  luaL_checkstack(L, 8, "xml: too deep");
  lua_newtable(L);
  int t = lua_gettop(L);
  lua_pushnil(L); /* the names made arrays here, { name = true }, created lazily */
  int multi = t + 1, have_multi = 0;
  for (const wxd_xml_node_t *ch = n->children; ch; ch = ch->next) {
    lua_pushstring(L, ch->name);
    int k = lua_gettop(L);
    push_value(L, ch, arrays);
    int v = k + 1;
    lua_pushvalue(L, k);
    lua_rawget(L, t);
    int old = v + 1;
    int make_array = 0;
    if (lua_isnil(L, old)) {
      if (arrays) {
        lua_pushvalue(L, k);
        lua_rawget(L, arrays);
        make_array = lua_toboolean(L, -1);
        lua_pop(L, 1);
      }
      if (!make_array) {
        lua_pushvalue(L, k);
        lua_pushvalue(L, v);
        lua_rawset(L, t);
      }
    } else {
      int is_multi = 0;
      if (have_multi) {
        lua_pushvalue(L, k);
        lua_rawget(L, multi);
        is_multi = lua_toboolean(L, -1);
        lua_pop(L, 1);
      }
      if (is_multi) {
        lua_pushvalue(L, v);
        lua_rawseti(L, old, (int)lua_objlen(L, old) + 1);
      } else {
        make_array = 1;
      }
    }
    if (make_array) {
      int have_old = !lua_isnil(L, old);
      lua_createtable(L, 2, 0);
      if (have_old) {
        lua_pushvalue(L, old);
        lua_rawseti(L, -2, 1);
      }
      lua_pushvalue(L, v);
      lua_rawseti(L, -2, have_old ? 2 : 1);
      lua_pushvalue(L, k);
      lua_insert(L, -2);
      lua_rawset(L, t);
      if (!have_multi) {
        lua_newtable(L);
        lua_replace(L, multi);
        have_multi = 1;
      }
      lua_pushvalue(L, k);
      lua_pushboolean(L, 1);
      lua_rawset(L, multi);
    }
    lua_settop(L, multi);
  }
  lua_settop(L, t);
}

int wxd_xml_check_limits(lua_State *L, int first, wxd_xml_limits_t *lim) {
  lua_Number mb = luaL_checknumber(L, first), md = luaL_checknumber(L, first + 1),
             me = luaL_checknumber(L, first + 2);
  luaL_argcheck(L, mb >= 0 && mb <= INT_MAX, first, "max_bytes out of range");
  luaL_argcheck(L, md >= 1 && md <= 1000, first + 1, "max_depth out of range (1..1000)");
  luaL_argcheck(L, me >= 1 && me <= 1e9, first + 2, "max_elements out of range");
  lim->max_bytes = (size_t)mb;
  lim->max_depth = (unsigned)md;
  lim->max_elements = (size_t)me;
  if (lua_isnoneornil(L, first + 3)) return 0;
  luaL_checktype(L, first + 3, LUA_TTABLE);
  return first + 3;
}

/* The flat shape (see xml.h) straight into a table: pushes the table and
 * "xml" (2), or nothing (0) for any other document, and for one with a
 * name twice or a name of `arrays` (push_element makes arrays of those) or
 * more children than FLAT_MAX_FIELDS. Nothing to free, so nothing to box. */
#define FLAT_MAX_FIELDS 64

static int decode_flat(lua_State *L, const char *s, size_t len, const wxd_xml_limits_t *lim, int arrays) {
  wxd_xml_flat_t f;
  wxd_xml_field_t fields[FLAT_MAX_FIELDS];
  int nf = 0, rc;
  if (!wxd_xml_flat_open(&f, s, len, lim)) return 0;
  for (;;) {
    if (nf == FLAT_MAX_FIELDS) return 0;
    rc = wxd_xml_flat_next(&f, &fields[nf]);
    if (rc != 1) break;
    for (int j = 0; j < nf; j++)
      if (fields[j].name_len == fields[nf].name_len && memcmp(fields[j].name, fields[nf].name, fields[nf].name_len) == 0)
        return 0;
    nf++;
  }
  if (rc != 0) return 0;
  luaL_checkstack(L, 6, "xml: no stack space");
  int top = lua_gettop(L);
  lua_createtable(L, 0, nf);
  for (int i = 0; i < nf; i++) {
    lua_pushlstring(L, fields[i].name, fields[i].name_len);
    if (arrays) {
      lua_pushvalue(L, -1);
      lua_rawget(L, arrays);
      int listed = lua_toboolean(L, -1);
      lua_pop(L, 1);
      if (listed) {
        lua_settop(L, top);
        return 0;
      }
    }
    lua_pushlstring(L, fields[i].text, fields[i].text_len);
    lua_rawset(L, -3);
  }
  lua_pushliteral(L, "xml");
  return 2;
}

/* Any document through expat and its tree. */
static int decode_expat(lua_State *L, const char *s, size_t len, const wxd_xml_limits_t *lim, int arrays) {
  doc_box_t *box = box_take(L);
  int boxi = lua_gettop(L);
  wxd_xml_error_t err;
  int rc = wxd_xml_parse(s, len, lim, &box->doc, &err);
  if (rc != WXD_XML_OK) {
    box_put_back(L, boxi);
    lua_pushnil(L);
    lua_pushstring(L, wxd_xml_strerror(rc));
    if (err.line) lua_pushfstring(L, "line %d, column %d: %s", (int)err.line, (int)err.column, err.detail);
    else lua_pushstring(L, err.detail ? err.detail : wxd_xml_strerror(rc));
    lua_remove(L, boxi);
    return 3;
  }
  const wxd_xml_node_t *root = wxd_xml_root(box->doc);
  if (root->children) push_element(L, root, arrays);
  else lua_newtable(L);
  lua_pushstring(L, root->name);
  wxd_xml_free(box->doc);
  box->doc = NULL;
  box_put_back(L, boxi);
  lua_remove(L, boxi);
  return 2;
}

int wxd_xml_decode_push(lua_State *L, const char *s, size_t len, const wxd_xml_limits_t *lim, int arrays) {
  int n = decode_flat(L, s, len, lim, arrays);
  return n ? n : decode_expat(L, s, len, lim, arrays);
}

enum { DECODE_ANY, DECODE_EXPAT, DECODE_FLAT };

/* decode(s, max_bytes, max_depth, max_elements [, arrays]) -> table, root
 * | nil, err, detail. Arguments are checked by lua/wxd/xml.lua. */
static int decode_with(lua_State *L, int way) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  wxd_xml_limits_t lim;
  int arrays = wxd_xml_check_limits(L, 2, &lim);
  lua_settop(L, 5);
  if (way == DECODE_EXPAT) return decode_expat(L, s, len, &lim, arrays);
  if (way == DECODE_FLAT) {
    int n = decode_flat(L, s, len, &lim, arrays);
    if (!n) lua_pushnil(L);
    return n ? n : 1;
  }
  return wxd_xml_decode_push(L, s, len, &lim, arrays);
}

static int xml_decode(lua_State *L) { return decode_with(L, DECODE_ANY); }

/* For specs only: one way of decode, forced. _decode_fast returns nil
 * alone when the document is not its to read. */
static int xml_decode_expat(lua_State *L) { return decode_with(L, DECODE_EXPAT); }

static int xml_decode_fast(lua_State *L) { return decode_with(L, DECODE_FLAT); }

/* ---- encoding ---- */

/* encode(tbl [, root]) builds the document in the state's scratch buffer.
 * Failures in the caller's data are collected in `err` (not raised at the
 * spot) so that nothing is left half-done; the caller raises them. */
typedef struct xml_enc {
  lua_State *L;
  wxd_buf_t *b;
  char err[200];
} xml_enc_t;

#define ENC_MAX_DEPTH 64

static int enc_fail(xml_enc_t *e, const char *fmt, const char *name, size_t nlen) {
  if (!e->err[0]) snprintf(e->err, sizeof e->err, fmt, (int)(nlen > 64 ? 64 : nlen), name ? name : "");
  return -1;
}

static int enc_put(xml_enc_t *e, const char *p, size_t n) {
  if (wxd_buf_append(e->b, p, n) != 0) return enc_fail(e, "%.*sout of memory", "", 0);
  return 0;
}
#define ENC_LIT(e, s) enc_put(e, s, sizeof(s) - 1)

/* ^[A-Za-z_][A-Za-z0-9_.-]*$ */
static int valid_name(const char *s, size_t n) {
  if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_')) return 0;
  for (size_t i = 1; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!(isalnum(c) || c == '_' || c == '.' || c == '-')) return 0;
  }
  return 1;
}

/* XML 1.0 cannot carry control characters other than tab, LF and CR. */
static int is_forbidden(unsigned char c) { return c < 0x20 && c != '\t' && c != '\n' && c != '\r'; }

static int enc_cdata(xml_enc_t *e, const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (is_forbidden((unsigned char)s[i]))
      return enc_fail(e, "%.*sa string contains a control character XML cannot carry", "", 0);
  }
  if (ENC_LIT(e, "<![CDATA[")) return -1;
  size_t from = 0;
  /* "]]>" would end the section: split it between two. */
  for (size_t i = 0; i + 2 < n; i++) {
    if (s[i] == ']' && s[i + 1] == ']' && s[i + 2] == '>') {
      if (enc_put(e, s + from, i + 2 - from) || ENC_LIT(e, "]]><![CDATA[")) return -1;
      from = i + 2;
    }
  }
  if (enc_put(e, s + from, n - from)) return -1;
  return ENC_LIT(e, "]]>");
}

static int enc_number(xml_enc_t *e, lua_Number d) {
  char tmp[40];
  int n;
  if (d != d) return enc_fail(e, "%.*scannot encode nan", "", 0);
  if (isinf(d)) return enc_fail(e, d > 0 ? "%.*scannot encode inf" : "%.*scannot encode -inf", "", 0);
  if (d == floor(d) && d > -9007199254740992.0 && d < 9007199254740992.0)
    n = snprintf(tmp, sizeof tmp, "%lld", (long long)d);
  else
    n = snprintf(tmp, sizeof tmp, "%.17g", d);
  return enc_put(e, tmp, (size_t)n);
}

static int is_array(lua_State *L, int t) {
  lua_rawgeti(L, t, 1);
  int yes = !lua_isnil(L, -1);
  lua_pop(L, 1);
  return yes;
}

static int enc_fields(xml_enc_t *e, int t, int depth);

/* <name>value</name>, or one such element per item of an array; the value
 * is at index v. */
static int enc_value(xml_enc_t *e, const char *name, size_t nlen, int v, int depth) {
  lua_State *L = e->L;
  int tv = lua_type(L, v);
  if (tv == LUA_TTABLE && is_array(L, v)) {
    size_t len = lua_objlen(L, v);
    for (size_t i = 1; i <= len; i++) {
      lua_rawgeti(L, v, (int)i);
      int item = lua_gettop(L);
      if (lua_type(L, item) == LUA_TTABLE && is_array(L, item))
        return enc_fail(e, "%.*s: nested arrays have no XML form", name, nlen);
      int rc = lua_isnil(L, item) ? 0 : enc_value(e, name, nlen, item, depth);
      lua_settop(L, item - 1);
      if (rc) return -1;
    }
    return 0;
  }
  if (ENC_LIT(e, "<") || enc_put(e, name, nlen) || ENC_LIT(e, ">")) return -1;
  int rc = 0;
  switch (tv) {
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, v, &n);
      rc = enc_cdata(e, s, n);
      break;
    }
    case LUA_TNUMBER: rc = enc_number(e, lua_tonumber(L, v)); break;
    case LUA_TBOOLEAN: rc = lua_toboolean(L, v) ? ENC_LIT(e, "true") : ENC_LIT(e, "false"); break;
    case LUA_TTABLE:
      if (depth > ENC_MAX_DEPTH) return enc_fail(e, "%.*s: nested too deep (a cycle?)", name, nlen);
      rc = enc_fields(e, v, depth + 1);
      break;
    default: {
      char fmt[80];
      snprintf(fmt, sizeof fmt, "%%.*s: cannot encode a %s", lua_typename(L, tv));
      return enc_fail(e, fmt, name, nlen);
    }
  }
  if (rc) return -1;
  if (ENC_LIT(e, "</") || enc_put(e, name, nlen)) return -1;
  return ENC_LIT(e, ">");
}

typedef struct enc_key {
  const char *s;
  size_t n;
} enc_key_t;

static int key_cmp(const void *a, const void *b) {
  const enc_key_t *x = a, *y = b;
  size_t n = x->n < y->n ? x->n : y->n;
  int c = memcmp(x->s, y->s, n);
  if (c) return c;
  return x->n < y->n ? -1 : x->n > y->n;
}

/* Whether name is among the first `count` names of the _order array. */
static int in_order(lua_State *L, int order, size_t count, const char *s, size_t n) {
  for (size_t i = 1; i <= count; i++) {
    lua_rawgeti(L, order, (int)i);
    size_t m;
    const char *o = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &m) : NULL;
    int same = o && m == n && memcmp(o, s, n) == 0;
    lua_pop(L, 1);
    if (same) return 1;
  }
  return 0;
}

/* Fields of the table at t: those named in t._order first, in that order,
 * then the others sorted as byte strings. */
static int enc_fields(xml_enc_t *e, int t, int depth) {
  lua_State *L = e->L;
  luaL_checkstack(L, 8, "wxd.xml.encode: nested too deep");
  int base = lua_gettop(L);
  lua_pushliteral(L, "_order");
  lua_rawget(L, t);
  int order = lua_gettop(L);
  size_t norder = 0;
  if (!lua_isnil(L, order)) {
    if (!lua_istable(L, order)) return enc_fail(e, "%.*s_order must be an array of names", "", 0);
    norder = lua_objlen(L, order);
    for (size_t i = 1; i <= norder; i++) {
      lua_rawgeti(L, order, (int)i);
      size_t n = 0;
      const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
      if (name && !in_order(L, order, i - 1, name, n)) { /* a repeated name counts once */
        lua_pushvalue(L, -1);
        lua_rawget(L, t);
        if (!lua_isnil(L, -1)) {
          if (!valid_name(name, n)) return enc_fail(e, "invalid element name %.*s", name, n);
          if (enc_value(e, name, n, lua_gettop(L), depth)) return -1;
        }
      }
      lua_settop(L, order);
    }
  }
  /* The other keys, sorted: counted first, so that a table with many gets
   * an array that the state owns (a userdata: a raise cannot leak it). */
  size_t nkeys = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      int number = lua_type(L, -1) == LUA_TNUMBER;
      lua_settop(L, base);
      return enc_fail(e, number ? "%.*skeys must be element names, got a number (an array is only allowed as a field's value)"
                                : "%.*skeys must be element names", "", 0);
    }
    nkeys++;
  }
  enc_key_t small[16], *keys = small;
  if (nkeys > 16) keys = lua_newuserdata(L, nkeys * sizeof *keys);
  int scratch_top = lua_gettop(L);
  size_t k = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    size_t n;
    const char *s = lua_tolstring(L, -1, &n); /* a string: checked above */
    if ((n == 6 && memcmp(s, "_order", 6) == 0) || (norder && in_order(L, order, norder, s, n))) continue;
    if (k < nkeys) { /* anchored by the table, which nothing modifies meanwhile */
      keys[k].s = s;
      keys[k].n = n;
      k++;
    }
  }
  qsort(keys, k, sizeof *keys, key_cmp);
  for (size_t i = 0; i < k; i++) {
    if (!valid_name(keys[i].s, keys[i].n)) return enc_fail(e, "invalid element name %.*s", keys[i].s, keys[i].n);
    lua_pushlstring(L, keys[i].s, keys[i].n);
    lua_rawget(L, t);
    int rc = enc_value(e, keys[i].s, keys[i].n, lua_gettop(L), depth);
    lua_settop(L, scratch_top);
    if (rc) return -1;
  }
  lua_settop(L, base);
  return 0;
}

/* encode(tbl [, root]) -> string; raises on data XML cannot carry (a bug
 * in the caller). */
static int xml_encode(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t rlen = 3;
  const char *root = "xml";
  if (!lua_isnoneornil(L, 2)) {
    if (lua_type(L, 2) != LUA_TSTRING) return luaL_error(L, "wxd.xml.encode: invalid root name %s", luaL_typename(L, 2));
    root = lua_tolstring(L, 2, &rlen);
  }
  if (!valid_name(root, rlen)) return luaL_error(L, "wxd.xml.encode: invalid root name %s", root);
  lua_settop(L, 2);
  if (is_array(L, 1)) return luaL_error(L, "wxd.xml.encode: the root table must have named fields, not be an array");
  xml_enc_t e = {.L = L, .b = wxd_scratch(L), .err = {0}};
  int rc = ENC_LIT(&e, "<") || enc_put(&e, root, rlen) || ENC_LIT(&e, ">") || enc_fields(&e, 1, 1) ||
           ENC_LIT(&e, "</") || enc_put(&e, root, rlen) || ENC_LIT(&e, ">");
  if (rc) {
    wxd_scratch_release(e.b);
    return luaL_error(L, "wxd.xml.encode: %s", e.err[0] ? e.err : "failed");
  }
  lua_pushlstring(L, e.b->data, e.b->len);
  wxd_scratch_release(e.b);
  return 1;
}

int wxd_open_xml(lua_State *L) {
  static const luaL_Reg fns[] = {{"decode", xml_decode},
                                 {"encode", xml_encode},
                                 {"_decode_expat", xml_decode_expat}, /* internal: specs only */
                                 {"_decode_fast", xml_decode_fast},   /* internal: specs only */
                                 {NULL, NULL}};
  luaL_newmetatable(L, DOC_MT);
  lua_pushcfunction(L, doc_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  lua_createtable(L, 0, 4);
  luaL_register(L, NULL, fns);
  lua_pushinteger(L, WXD_XML_MAX_BYTES);
  lua_setfield(L, -2, "MAX_BYTES");
  lua_pushinteger(L, WXD_XML_MAX_DEPTH);
  lua_setfield(L, -2, "MAX_DEPTH");
  lua_pushinteger(L, WXD_XML_MAX_ELEMENTS);
  lua_setfield(L, -2, "MAX_ELEMENTS");
  return 1;
}
