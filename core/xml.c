/* xml: see xml.h. */
#include "xml.h"

#include <expat.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  c.doc = calloc(1, sizeof *c.doc);
  c.stack = calloc((size_t)lim->max_depth + 1, sizeof *c.stack);
  c.p = XML_ParserCreate(NULL);
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
  if (c.p) XML_ParserFree(c.p);
  free(c.stack);
  free(c.text);
  if (code != WXD_XML_OK) {
    wxd_xml_free(c.doc);
    return code;
  }
  *out = c.doc;
  return WXD_XML_OK;
}

/* ---- Lua ---- */

#define DOC_MT "wxd.xml.doc"

/* A parsed document is held by a userdata until its tables are built, so
 * that a Lua error (out of memory) while building them cannot leak it. */
static int doc_gc(lua_State *L) {
  wxd_xml_doc_t **box = luaL_checkudata(L, 1, DOC_MT);
  wxd_xml_free(*box);
  *box = NULL;
  return 0;
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

/* decode(s, max_bytes, max_depth, max_elements [, arrays]) -> table, root
 * | nil, err, detail. Arguments are checked by lua/wxd/xml.lua. */
static int xml_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  wxd_xml_limits_t lim;
  lua_Number mb = luaL_checknumber(L, 2), md = luaL_checknumber(L, 3), me = luaL_checknumber(L, 4);
  luaL_argcheck(L, mb >= 0 && mb <= INT_MAX, 2, "max_bytes out of range");
  luaL_argcheck(L, md >= 1 && md <= 1000, 3, "max_depth out of range (1..1000)");
  luaL_argcheck(L, me >= 1 && me <= 1e9, 4, "max_elements out of range");
  lim.max_bytes = (size_t)mb;
  lim.max_depth = (unsigned)md;
  lim.max_elements = (size_t)me;
  int arrays = 0;
  if (!lua_isnoneornil(L, 5)) {
    luaL_checktype(L, 5, LUA_TTABLE);
    arrays = 5;
  }
  lua_settop(L, 5);

  wxd_xml_doc_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, DOC_MT);
  lua_setmetatable(L, -2);
  wxd_xml_error_t err;
  int rc = wxd_xml_parse(s, len, &lim, box, &err);
  if (rc != WXD_XML_OK) {
    lua_pushnil(L);
    lua_pushstring(L, wxd_xml_strerror(rc));
    if (err.line) lua_pushfstring(L, "line %d, column %d: %s", (int)err.line, (int)err.column, err.detail);
    else lua_pushstring(L, err.detail ? err.detail : wxd_xml_strerror(rc));
    return 3;
  }
  const wxd_xml_node_t *root = wxd_xml_root(*box);
  if (root->children) push_element(L, root, arrays);
  else lua_newtable(L);
  lua_pushstring(L, root->name);
  wxd_xml_free(*box);
  *box = NULL;
  return 2;
}

int wxd_open_xml(lua_State *L) {
  static const luaL_Reg fns[] = {{"decode", xml_decode}, {NULL, NULL}};
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
