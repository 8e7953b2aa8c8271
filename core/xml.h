/* xml: untrusted XML (WeChat messages, WeChat Pay v2 notifications) into a
 * small tree, with expat.
 *
 * Lua sees this as the native module `wxd.core.xml`; lua/wxd/xml.lua puts
 * the public API on top (decode to a table, encode from a table).
 *
 * What is refused, and why:
 *  - any DOCTYPE, hence any entity declaration: the parse stops at the
 *    first `<!DOCTYPE` (XXE, billion laughs). External entities are refused
 *    and parameter entities never parsed, should expat reach one anyway.
 *    Only the five predefined entities and character references work.
 *  - more than max_bytes of input, more than max_depth nested elements,
 *    more than max_elements elements: the work and the memory of a parse
 *    are bounded by the input's size, whatever its shape.
 *
 * The parser builds a tree of elements in an arena owned by the document;
 * attributes, comments and processing instructions are dropped. A leaf's
 * text is its character data as sent (plain text and CDATA concatenated,
 * nothing trimmed); the text of an element that has children is dropped.
 *
 * wxd_xml_parse never touches Lua (the fuzz target in spec/fuzz/ calls it
 * directly), so that no Lua error can unwind through expat.
 */
#ifndef WXD_XML_H
#define WXD_XML_H

#include <lua.h>
#include <stddef.h>

typedef struct wxd_xml_node wxd_xml_node_t;

struct wxd_xml_node {
  const char *name;         /* NUL-terminated, owned by the document */
  const char *text;         /* a leaf's text (may hold NULs), else NULL */
  size_t text_len;
  wxd_xml_node_t *children; /* first child, or NULL for a leaf */
  wxd_xml_node_t *last;     /* last child (appending) */
  wxd_xml_node_t *next;     /* next sibling */
};

typedef struct wxd_xml_doc wxd_xml_doc_t; /* opaque: the arena */

typedef struct wxd_xml_limits {
  size_t max_bytes;    /* input size; at most INT_MAX */
  unsigned max_depth;  /* the root is depth 1 */
  size_t max_elements; /* every element, the root included */
} wxd_xml_limits_t;

/* Defaults: 1 MiB, 32 levels, 10000 elements. */
#define WXD_XML_MAX_BYTES (1024 * 1024)
#define WXD_XML_MAX_DEPTH 32
#define WXD_XML_MAX_ELEMENTS 10000

enum {
  WXD_XML_OK = 0,
  WXD_XML_EINVALID = -1, /* not well-formed, an undefined entity, ... */
  WXD_XML_EDOCTYPE = -2, /* a DOCTYPE or an entity: refused outright */
  WXD_XML_ETOOLARGE = -3,
  WXD_XML_ETOODEEP = -4,
  WXD_XML_ETOOMANY = -5, /* more than max_elements */
  WXD_XML_ENOMEM = -6,
};

/* Where and why a parse failed: position of expat's current token, and
 * expat's message (a static string; it never quotes the input). */
typedef struct wxd_xml_error {
  unsigned long line, column;
  const char *detail;
} wxd_xml_error_t;

/* Parses buf[0..len). On success returns WXD_XML_OK and sets *doc (free it
 * with wxd_xml_free; wxd_xml_root gives its root element). On failure
 * returns a WXD_XML_E* code, leaves *doc NULL, fills *err (may be NULL),
 * and has freed everything it allocated. */
int wxd_xml_parse(const char *buf, size_t len, const wxd_xml_limits_t *lim, wxd_xml_doc_t **doc,
                  wxd_xml_error_t *err);
/* The root element of a parsed document. */
const wxd_xml_node_t *wxd_xml_root(const wxd_xml_doc_t *doc);
/* Frees a document and every node and string in it. NULL is a no-op. */
void wxd_xml_free(wxd_xml_doc_t *doc);
/* The short stable string of a code ("invalid xml", "doctype not allowed",
 * "too large", "too deep", "too many elements", "out of memory"). */
const char *wxd_xml_strerror(int code);

/* ---- WeChat's flat shape, read without expat ----
 *
 * Almost every WeChat document is "<xml>", then child elements named
 * [A-Za-z_][A-Za-z0-9_]* without attributes, each holding exactly one
 * CDATA section or non-empty plain text, white space between them, then
 * "</xml>" and white space. The flat scanner reads that shape and nothing
 * else: whatever it accepts, expat reads the same way (same elements, same
 * texts, no error), so a caller may skip expat for it. Text must be XML
 * characters in strict UTF-8 without CR (expat would normalise line ends);
 * plain text also has no white space, '<', '&', '>' or ']'. Anything else
 * (a declaration, comment, attribute, entity, nested or empty element,
 * max_bytes or max_elements exceeded, max_depth < 2) is "not the shape":
 * the caller then parses with expat, which accepts or refuses it.
 * spec/01-unit/xml_fast_spec.lua and wxmsg_spec.lua compare the two. */
typedef struct wxd_xml_flat {
  const char *s;
  size_t n, at;        /* the document and the scan position */
  size_t elements;     /* seen so far, the root included */
  size_t max_elements;
} wxd_xml_flat_t;

typedef struct wxd_xml_field {
  const char *name; /* into the document, not NUL-terminated */
  size_t name_len;
  const char *text; /* the element's text as expat gives it */
  size_t text_len;
} wxd_xml_field_t;

/* Starts a scan of s[0..n): 1, or 0 when it cannot be of the shape. */
int wxd_xml_flat_open(wxd_xml_flat_t *f, const char *s, size_t n, const wxd_xml_limits_t *lim);
/* The next child: 1 (*field set), 0 (the document ended, and all of it
 * is of the shape), -1 (not the shape). */
int wxd_xml_flat_next(wxd_xml_flat_t *f, wxd_xml_field_t *field);

/* Parses buf[0..len) and pushes what wxd.core.xml's decode returns: the
 * root's children as a table and the root's name (2), or nil, err, detail
 * (3). `arrays` is the stack index of a set of names always made arrays,
 * or 0. For native callers that hold the bytes in C (core/wxmsg.c).
 * A document of the flat shape is pushed straight from its bytes (the
 * same table expat's tree gives); anything else goes through expat. */
int wxd_xml_decode_push(lua_State *L, const char *buf, size_t len, const wxd_xml_limits_t *lim, int arrays);

/* Reads the limits from arguments first..first+2 (max_bytes, max_depth,
 * max_elements: raises when out of range) and an optional set of names
 * always made arrays at first+3; returns that set's index, or 0. */
int wxd_xml_check_limits(lua_State *L, int first, wxd_xml_limits_t *lim);

/* Lua module wxd.core.xml; returns the module table. */
int wxd_open_xml(lua_State *L);

#endif
