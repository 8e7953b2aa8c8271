/* libFuzzer target: PKCS#7 unpadding (core/crypto.c), checked against a
 * plain reference written the obvious way.
 *
 * The first byte is the pad block (0 is mapped to 1); the rest is the
 * decrypted buffer. wxd_pkcs7_unpad is written without data-dependent
 * branches, which is easy to get subtly wrong: the reference is not. Then
 * the input is padded with wxd_pkcs7_pad and must unpad to itself.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"

static int reference_unpad(const unsigned char *buf, size_t len, size_t block, size_t *outlen) {
  if (len == 0) return -1;
  size_t p = buf[len - 1];
  if (p < 1 || p > block || p > len) return -1;
  for (size_t i = len - p; i < len; i++)
    if (buf[i] != p) return -1;
  *outlen = len - p;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  size_t block = data[0] ? data[0] : 1;
  const unsigned char *buf = data + 1;
  size_t len = size - 1;

  size_t got = 0, want = 0;
  int rc = wxd_pkcs7_unpad(buf, len, block, &got);
  int ref = reference_unpad(buf, len, block, &want);
  if (rc != ref) abort();
  if (rc == 0 && got != want) abort();

  unsigned char *padded = malloc(len + block);
  memcpy(padded, buf, len);
  size_t plen = wxd_pkcs7_pad(padded, len, block);
  if (plen % block != 0 || plen <= len || plen > len + block) abort();
  size_t back = 0;
  if (wxd_pkcs7_unpad(padded, plen, block, &back) != 0 || back != len) abort();
  free(padded);
  return 0;
}
