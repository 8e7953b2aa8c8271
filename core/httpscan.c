/* httpscan: see httpscan.h. */
#include "httpscan.h"

#include <string.h>

enum { CS_SIZE, CS_EXT, CS_SIZE_LF, CS_DATA, CS_DATA_CR, CS_DATA_LF, CS_TRAILERS };

void wxd_scan_head(wxd_scan_t *s, int is_request) {
  memset(s, 0, sizeof *s);
  s->mode = WXD_SCAN_HEAD;
  s->is_request = is_request;
}

void wxd_scan_chunked(wxd_scan_t *s, uint64_t max_body) {
  memset(s, 0, sizeof *s);
  s->mode = WXD_SCAN_CHUNKED;
  s->cs = CS_SIZE;
  s->max_body = max_body;
}

/* One byte of a header-like line. Returns 1 at the blank line that ends the
 * part, 0 to go on, -1 to refuse. has_start_line: line 0 is a request or
 * status line, not a field. */
static int scan_line_byte(wxd_scan_t *s, unsigned char ch, int has_start_line) {
  if (ch == '\n') {
    if (!s->saw_cr) return -1; /* bare LF */
    s->saw_cr = 0;
    if (s->line_len == 0) {
      if (s->line > 0 || !has_start_line) return 1;
      /* Empty lines before a request line are tolerated (RFC 9112 2.2); a
       * response has no such excuse. */
      return s->is_request ? 0 : -1;
    }
    s->line++;
    s->line_len = 0;
    s->in_name = 1;
    return 0;
  }
  if (s->saw_cr) return -1; /* CR not followed by LF */
  if (ch == '\r') {
    s->saw_cr = 1;
    return 0;
  }
  if (s->line > 0 || !has_start_line) {
    if (s->line_len == 0 && (ch == ' ' || ch == '\t')) return -1; /* obs-fold */
    if (s->line_len == 0 && ch == ':') return -1;                  /* empty name */
    if (s->in_name) {
      if (ch == ':') s->in_name = 0;
      else if (ch == ' ' || ch == '\t') return -1; /* space in a name */
    }
  }
  s->line_len++;
  return 0;
}

static int hexval(unsigned char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

int wxd_scan(wxd_scan_t *s, const char *data, size_t len, size_t max_head, size_t *upto) {
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)data[i];
    if (s->mode == WXD_SCAN_HEAD || (s->mode == WXD_SCAN_CHUNKED && s->cs == CS_TRAILERS)) {
      if (++s->bytes > max_head) return WXD_SCAN_HEAD_TOO_LARGE;
      int r = scan_line_byte(s, ch, s->mode == WXD_SCAN_HEAD);
      if (r < 0) return WXD_SCAN_MALFORMED;
      if (r > 0) {
        s->mode = WXD_SCAN_OFF;
        *upto = i + 1;
        return WXD_SCAN_OK;
      }
      continue;
    }
    switch (s->cs) {
      case CS_SIZE: {
        int v = hexval(ch);
        if (++s->chunk_line > WXD_SCAN_CHUNK_LINE_MAX) return WXD_SCAN_CHUNK_LINE_LONG;
        if (v >= 0) {
          if (++s->ndigits > 15) return WXD_SCAN_MALFORMED; /* no chunk is that large */
          s->remaining = s->remaining * 16 + (uint64_t)v;
          /* Digits only ever make the size larger: refuse as soon as it
           * is over, without waiting for the rest of the line. */
          if (s->remaining > s->max_body - s->announced) return WXD_SCAN_BODY_TOO_LARGE;
        } else if (s->ndigits > 0 && ch == ';') {
          s->cs = CS_EXT;
        } else if (s->ndigits > 0 && ch == '\r') {
          s->cs = CS_SIZE_LF;
        } else {
          return WXD_SCAN_MALFORMED;
        }
        break;
      }
      case CS_EXT:
        if (++s->chunk_line > WXD_SCAN_CHUNK_LINE_MAX) return WXD_SCAN_CHUNK_LINE_LONG;
        if (ch == '\r') s->cs = CS_SIZE_LF;
        else if (ch == '\n' || ch == 0) return WXD_SCAN_MALFORMED;
        break;
      case CS_SIZE_LF:
        if (ch != '\n') return WXD_SCAN_MALFORMED;
        if (s->remaining == 0) {
          /* The last chunk: trailers follow, as field lines. */
          s->cs = CS_TRAILERS;
          s->line = 1;
          s->line_len = 0;
          s->in_name = 1;
          s->saw_cr = 0;
          s->bytes = 0;
        } else {
          s->announced += s->remaining;
          s->cs = CS_DATA;
        }
        break;
      case CS_DATA: {
        uint64_t take = len - i;
        if (take > s->remaining) take = s->remaining;
        s->remaining -= take;
        i += (size_t)take - 1;
        if (s->remaining == 0) s->cs = CS_DATA_CR;
        break;
      }
      case CS_DATA_CR:
        if (ch != '\r') return WXD_SCAN_MALFORMED;
        s->cs = CS_DATA_LF;
        break;
      case CS_DATA_LF:
        if (ch != '\n') return WXD_SCAN_MALFORMED;
        s->cs = CS_SIZE;
        s->ndigits = 0;
        s->remaining = 0;
        s->chunk_line = 0;
        break;
    }
  }
  *upto = len;
  return WXD_SCAN_OK;
}
