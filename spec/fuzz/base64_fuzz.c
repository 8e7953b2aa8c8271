/* libFuzzer target: strict base64 decoding (core/crypto.c).
 *
 * The first byte picks the alphabet (bit 0: URL-safe), the padding of the
 * re-encoding check (bit 1) and WXD_BASE64_ANY_TAIL (bit 2); the rest is
 * the text to decode. Checked beyond "no memory error":
 *  - an accepted input decodes to at most WXD_BASE64_DECODED_MAX bytes and
 *    re-encodes to the very same text (strict), or to the same text but
 *    for the unused low bits of its last character (WXD_BASE64_ANY_TAIL:
 *    same length, same characters but the last one);
 *  - the rest of the input, taken as bytes, survives encode then decode.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int alphabet = (data[0] & 1) ? WXD_BASE64_URL : WXD_BASE64_STD;
  int any_tail = data[0] & 4;
  const char *in = (const char *)data + 1;
  size_t len = size - 1;

  unsigned char *out = malloc(WXD_BASE64_DECODED_MAX(len) + 1);
  char *again = malloc(WXD_BASE64_ENCODED_LEN(WXD_BASE64_DECODED_MAX(len)) + 1);
  size_t n = 0;
  if (wxd_base64_decode(in, len, out, &n, alphabet | (any_tail ? WXD_BASE64_ANY_TAIL : 0)) == 0) {
    if (n > WXD_BASE64_DECODED_MAX(len)) abort();
    /* Re-encode with the padding the input had (the URL alphabet allows both). */
    int padded = len > 0 && in[len - 1] == '=';
    size_t m = wxd_base64_encode(out, n, again, alphabet, padded);
    if (m != len) abort();
    if (!any_tail) {
      if (memcmp(again, in, len) != 0) abort();
    } else if (len > 0) {
      size_t last = len - 1;
      while (last > 0 && in[last] == '=') last--;
      if (memcmp(again, in, last) != 0) abort();
      if (memcmp(again + last + 1, in + last + 1, len - last - 1) != 0) abort();
    }
  }

  /* Any bytes: encode, then the strict decoder must take them back. */
  char *enc = malloc(WXD_BASE64_ENCODED_LEN(len) + 1);
  unsigned char *dec = malloc(WXD_BASE64_DECODED_MAX(WXD_BASE64_ENCODED_LEN(len)) + 1);
  size_t elen = wxd_base64_encode(data + 1, len, enc, alphabet, data[0] & 2);
  size_t dlen = 0;
  if (wxd_base64_decode(enc, elen, dec, &dlen, alphabet) != 0) abort();
  if (dlen != len || memcmp(dec, data + 1, len) != 0) abort();

  free(out);
  free(again);
  free(enc);
  free(dec);
  return 0;
}
