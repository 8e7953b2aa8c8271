/* journal: see journal.h. */
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "bell.h"
#include "log.h"
#include "vm.h"

/* ---- Encoding ---- */

void wxd_jput_u32(wxd_buf_t *b, uint32_t v, int *rc) {
  unsigned char p[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                        (unsigned char)(v >> 24)};
  if (wxd_buf_append(b, p, 4) != 0) *rc = -1;
}

void wxd_jput_u8(wxd_buf_t *b, int v, int *rc) {
  unsigned char c = (unsigned char)v;
  if (wxd_buf_append(b, &c, 1) != 0) *rc = -1;
}

void wxd_jput_i64(wxd_buf_t *b, int64_t v, int *rc) {
  uint64_t u = (uint64_t)v;
  wxd_jput_u32(b, (uint32_t)u, rc);
  wxd_jput_u32(b, (uint32_t)(u >> 32), rc);
}

#define NO_STR 0xffffffffu

void wxd_jput_str(wxd_buf_t *b, const char *s, size_t len, int *rc) {
  if (!s) return wxd_jput_u32(b, NO_STR, rc);
  wxd_jput_u32(b, (uint32_t)len, rc);
  if (wxd_buf_append(b, s, len) != 0) *rc = -1;
}

uint32_t wxd_jget_u32(wxd_jreader_t *r) {
  if (r->len - r->off < 4) {
    r->bad = 1;
    return 0;
  }
  const unsigned char *p = r->p + r->off;
  r->off += 4;
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int wxd_jget_u8(wxd_jreader_t *r) {
  if (r->off >= r->len) {
    r->bad = 1;
    return 0;
  }
  return r->p[r->off++];
}

int64_t wxd_jget_i64(wxd_jreader_t *r) {
  uint64_t lo = wxd_jget_u32(r), hi = wxd_jget_u32(r);
  return (int64_t)(lo | hi << 32);
}

const char *wxd_jget_str(wxd_jreader_t *r, size_t *len) {
  uint32_t n = wxd_jget_u32(r);
  *len = 0;
  if (r->bad || n == NO_STR) return NULL;
  if (r->len - r->off < n) {
    r->bad = 1;
    return NULL;
  }
  const char *s = (const char *)r->p + r->off;
  r->off += n;
  *len = n;
  return s;
}

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}

static uint32_t crc32_of(const void *p, size_t len) {
  pthread_once(&crc_once, crc_init);
  const unsigned char *s = p;
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < len; i++) c = crc_table[(c ^ s[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

void wxd_journal_rec_begin(wxd_buf_t *b, size_t *start, int *rc) {
  *start = b->len;
  wxd_jput_u32(b, 0, rc);
  wxd_jput_u32(b, 0, rc);
}

void wxd_journal_rec_end(wxd_buf_t *b, size_t start) {
  size_t plen = b->len - start - 8;
  unsigned char *h = (unsigned char *)b->data + start;
  uint32_t crc = crc32_of(h + 8, plen);
  for (int i = 0; i < 4; i++) {
    h[i] = (unsigned char)(plen >> (8 * i));
    h[4 + i] = (unsigned char)(crc >> (8 * i));
  }
}

/* ---- Waiters ---- */

struct wxd_journal_waiter {
  wxd_bell_item_t item;      /* first member: posted to the bell once durable */
  wxd_bell_t *bell;          /* the waiting coroutine's loop's */
  wxd_journal_t *j;
  wxd_co_t *co;
  uint64_t seq;
  wxd_journal_push_fn push;
  wxd_journal_drop_fn drop;
  void *data;                /* the owner's, until push or drop took it */
  wxd_journal_waiter_t *prev, *next;
  int linked;                /* in j->waiters */
};

static void unlink_waiter(wxd_journal_t *j, wxd_journal_waiter_t *w) {
  if (w->prev) w->prev->next = w->next;
  else j->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  w->linked = 0;
}

/* Hands every waiter whose record is durable (or never will be) to its
 * loop's bell: a batch wakes each loop once. Mutex held. A bell that
 * refuses (its loop is ending) leaves the waiter to its cancel. */
static void wake_waiters(wxd_journal_t *j) {
  wxd_journal_waiter_t *w = j->waiters;
  while (w) {
    wxd_journal_waiter_t *next = w->next;
    if (w->seq <= j->durable || j->io_errno) {
      unlink_waiter(j, w);
      wxd_bell_post(w->bell, &w->item);
    }
    w = next;
  }
}

/* 0 when seq is durable, else the error (mutex held). */
static int outcome(const wxd_journal_t *j, uint64_t seq) {
  if (seq <= j->durable) return 0;
  return j->io_errno ? j->io_errno : EIO;
}

/* wxd_journal_sync's results. */
static int push_sync(lua_State *L, void *data, int err) {
  (void)data;
  if (!err) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushfstring(L, "journal: %s", strerror(err));
  return 2;
}

/* The bell runs it on the waiting coroutine's loop. */
static void waiter_run(wxd_bell_item_t *it) {
  wxd_journal_waiter_t *w = (wxd_journal_waiter_t *)it;
  wxd_bell_settle(w->bell);
  pthread_mutex_lock(w->j->mu);
  int err = outcome(w->j, w->seq);
  pthread_mutex_unlock(w->j->mu);
  wxd_co_t *co = w->co;
  int n = w->push(co->T, w->data, err);
  free(w);
  wxd_co_resume(co, n);
}

/* The waiting coroutine's VM shuts down: free without resuming. */
static void waiter_cancel(void *p) {
  wxd_journal_waiter_t *w = p;
  pthread_mutex_lock(w->j->mu);
  if (w->linked) unlink_waiter(w->j, w);
  pthread_mutex_unlock(w->j->mu);
  /* Not linked: handed to the bell (under the mutex, so before we looked). */
  wxd_bell_unpost(w->bell, &w->item);
  wxd_bell_settle(w->bell);
  if (w->data && w->drop) w->drop(w->data);
  free(w);
}

int wxd_journal_wait(lua_State *L, wxd_journal_t *j, uint64_t seq, wxd_journal_push_fn push,
                     wxd_journal_drop_fn drop, void *data) {
  pthread_mutex_lock(j->mu);
  int ready = seq <= j->durable || j->io_errno;
  pthread_mutex_unlock(j->mu);
  wxd_co_t *co = ready ? NULL : wxd_co_lookup(L);
  wxd_journal_waiter_t *w = co && co->vm->bell ? calloc(1, sizeof *w) : NULL;
  if (w) {
    w->item.run = waiter_run;
    w->bell = co->vm->bell;
    w->j = j;
    w->co = co;
    w->seq = seq;
    w->push = push;
    w->drop = drop;
    w->data = data;
    pthread_mutex_lock(j->mu);
    ready = seq <= j->durable || j->io_errno; /* became durable meanwhile */
    if (!ready) {
      w->next = j->waiters;
      if (j->waiters) j->waiters->prev = w;
      j->waiters = w;
      w->linked = 1;
    }
    pthread_mutex_unlock(j->mu);
    if (!ready) {
      wxd_bell_expect(w->bell);
      return wxd_co_yield_cancellable(co, L, waiter_cancel, w);
    }
    free(w);
  }
  /* Durable already, or outside a coroutine (or a loop without a bell, or
   * no memory for the waiter): block. */
  pthread_mutex_lock(j->mu);
  while (seq > j->durable && !j->io_errno) pthread_cond_wait(&j->durable_cv, j->mu);
  int err = outcome(j, seq);
  pthread_mutex_unlock(j->mu);
  return push(L, data, err);
}

int wxd_journal_sync(lua_State *L, wxd_journal_t *j, uint64_t seq) {
  return wxd_journal_wait(L, j, seq, push_sync, NULL, NULL);
}

uint64_t wxd_journal_queued(wxd_journal_t *j) {
  j->appended++;
  if (!j->path) {
    j->pending.len = 0;
    j->durable = j->appended;
  } else {
    pthread_cond_signal(&j->work);
  }
  return j->appended;
}

/* ---- Files ---- */

static int pwrite_all(int fd, const char *p, size_t len, size_t at) {
  while (len > 0) {
    ssize_t n = pwrite(fd, p, len, (off_t)at);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += n;
    len -= (size_t)n;
    at += (size_t)n;
  }
  return 0;
}

/* Zero-filled space kept ahead of the commits. */
#define PREALLOC_BYTES ((size_t)4 << 20)

/* Zero-fills the next PREALLOC_BYTES after alloc_end and syncs them, so that
 * commits overwrite allocated blocks whose size and block map are on disk.
 * A failure (no space, a file size limit) is not an error: the file is cut
 * back and commits extend it as they write, fdatasync persisting the size.
 * Run by the opener, then by the writer thread alone, without the mutex. */
static void prealloc(wxd_journal_t *j) {
  static const char zeros[65536];
  if (j->no_prealloc) return;
  size_t at = j->alloc_end, end = j->alloc_end + PREALLOC_BYTES;
  int err = 0;
  while (at < end && !err) {
    size_t n = end - at < sizeof zeros ? end - at : sizeof zeros;
    err = pwrite_all(j->fd, zeros, n, at);
    if (!err) at += n;
  }
  if (!err && fdatasync(j->fd) != 0) err = errno;
  if (err) {
    j->no_prealloc = 1;
    if (ftruncate(j->fd, (off_t)j->alloc_end) != 0) err = errno;
    wxd_logf(WXD_LOG_WARN, -1, "%s %s: cannot zero-fill space ahead (%s); commits extend the file instead", j->what,
             j->path, strerror(err));
    return;
  }
  j->alloc_end = at;
}

static int fsync_dir_of(const char *path) {
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (slash == dir) slash[1] = '\0';
  else if (slash) *slash = '\0';
  else snprintf(dir, sizeof dir, ".");
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

/* Writes `out` as the whole journal (PATH.tmp, fsync, rename, fsync of the
 * directory) and opens it for writing into *fd. Returns 0 or an errno. */
static int rewrite(const char *path, const wxd_buf_t *out, int *fd_out) {
  char tmp[PATH_MAX + 8];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int e = fd < 0 ? errno : pwrite_all(fd, out->data, out->len, 0);
  if (!e && fsync(fd) != 0) e = errno;
  if (fd >= 0) close(fd);
  if (!e && rename(tmp, path) != 0) e = errno;
  if (!e && fsync_dir_of(path) != 0) e = errno;
  if (e) {
    unlink(tmp);
    return e;
  }
  fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  *fd_out = fd;
  return 0;
}

int wxd_journal_append_file(const char *path, const void *p, size_t len) {
  int created = 1;
  int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    created = 0;
    fd = open(path, O_RDWR | O_CLOEXEC);
  }
  if (fd < 0) return errno;
  struct stat sb;
  int e = fstat(fd, &sb) != 0 ? errno : 0;
  size_t at = e ? 0 : (size_t)sb.st_size;
  char last = '\n';
  if (!e && at > 0 && pread(fd, &last, 1, (off_t)at - 1) != 1) e = errno ? errno : EIO;
  if (!e && last != '\n') e = pwrite_all(fd, "\n", 1, at);
  if (!e) e = pwrite_all(fd, p, len, at + (last != '\n'));
  if (!e && fsync(fd) != 0) e = errno;
  if (e && ftruncate(fd, (off_t)at) == 0) (void)fsync(fd);
  close(fd);
  if (!e && created && fsync_dir_of(path) != 0) e = errno;
  if (e && created) unlink(path);
  return e;
}

static size_t next_compaction(const wxd_journal_t *j, size_t live) {
  size_t at = live * 4;
  return at < j->compact_min ? j->compact_min : at;
}

static void *writer_main(void *arg) {
  wxd_journal_t *j = arg;
  wxd_buf_t out = {0};
  pthread_mutex_lock(j->mu);
  for (;;) {
    while (j->pending.len == 0) pthread_cond_wait(&j->work, j->mu);
    uint64_t upto = j->appended;
    int compact = j->compact_bytes && j->file_bytes + j->pending.len > j->compact_bytes;
    if (compact) {
      /* The dump holds every change up to now: what is pending is in it. */
      out.len = 0;
      if (j->dump(j->ctx, &out) != 0) compact = 0;
      else j->pending.len = 0;
    }
    if (!compact) {
      wxd_buf_t tmp = j->pending;
      j->pending = out;
      j->pending.len = 0;
      out = tmp;
    }
    pthread_mutex_unlock(j->mu);
    int err, fd = -1;
    if (compact) {
      err = rewrite(j->path, &out, &fd);
      if (!err) {
        close(j->fd);
        j->fd = fd; /* only this thread uses fd, file_bytes' offset and alloc_end once running */
        j->alloc_end = out.len;
        j->no_prealloc = 0;
      }
    } else {
      /* One write and one fdatasync for every record queued meanwhile
       * (group commit), into zero-filled space when there is some. */
      while (j->file_bytes + out.len > j->alloc_end && !j->no_prealloc) prealloc(j);
      err = pwrite_all(j->fd, out.data, out.len, j->file_bytes);
      if (!err && fdatasync(j->fd) != 0) err = errno;
    }
    size_t written = out.len;
    out.len = 0;
    pthread_mutex_lock(j->mu);
    if (err) {
      j->io_errno = err;
    } else {
      j->durable = upto;
      if (compact) {
        j->file_bytes = written;
        j->compact_bytes = next_compaction(j, written);
        j->compactions++;
      } else {
        j->file_bytes += written;
      }
    }
    j->commits++;
    wake_waiters(j);
    pthread_cond_broadcast(&j->durable_cv);
    if (err) break;
    if (!j->no_prealloc && j->alloc_end - j->file_bytes < PREALLOC_BYTES / 4) {
      /* Ahead of need, once the waiters are woken: records queued meanwhile
       * wait for it (about 20 ms per 4 MiB) once in a while. */
      pthread_mutex_unlock(j->mu);
      prealloc(j);
      pthread_mutex_lock(j->mu);
    }
  }
  pthread_mutex_unlock(j->mu);
  wxd_logf(WXD_LOG_ERROR, -1, "%s %s: %s; changes are refused until a restart", j->what, j->path,
           strerror(j->io_errno));
  wxd_buf_free(&out);
  return NULL;
}

static int read_file(const char *path, wxd_buf_t *file, const char *what, char *err, size_t errlen) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return 0;
    snprintf(err, errlen, "%s %s: %s", what, path, strerror(errno));
    return -1;
  }
  char chunk[65536];
  for (;;) {
    ssize_t n = read(fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (n > 0 && wxd_buf_append(file, chunk, (size_t)n) != 0)) {
      snprintf(err, errlen, "%s %s: %s", what, path, n < 0 ? strerror(errno) : "out of memory");
      close(fd);
      return -1;
    }
    if (n == 0) break;
  }
  close(fd);
  return 0;
}

int wxd_journal_open(wxd_journal_t *j, const char *what, const char *path, pthread_mutex_t *mu,
                     wxd_journal_replay_fn replay, wxd_journal_dump_fn dump, void *ctx, char *err, size_t errlen) {
  memset(j, 0, sizeof *j);
  j->what = what;
  j->mu = mu;
  j->fd = -1;
  j->dump = dump;
  j->ctx = ctx;
  pthread_cond_init(&j->work, NULL);
  pthread_cond_init(&j->durable_cv, NULL);
  if (!path) return 0;
  if (!(j->path = strdup(path))) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  wxd_buf_t file = {0};
  if (read_file(path, &file, what, err, errlen) != 0) goto fail;
  size_t off = 0, nrec = 0;
  while (off < file.len) {
    if (file.len - off < 8) break;
    wxd_jreader_t h = {(const unsigned char *)file.data + off, 8, 0, 0};
    uint32_t plen = wxd_jget_u32(&h), crc = wxd_jget_u32(&h);
    if (plen == 0 || plen > file.len - off - 8) break;
    const unsigned char *payload = (const unsigned char *)file.data + off + 8;
    if (crc32_of(payload, plen) != crc) break;
    if (replay(ctx, payload, plen, off, err, errlen) != 0) goto fail;
    off += 8 + plen;
    nrec++;
  }
  /* Zeros after the last record are the space kept ahead (prealloc). */
  size_t tail = off;
  while (tail < file.len && file.data[tail] == 0) tail++;
  if (tail < file.len)
    wxd_logf(WXD_LOG_WARN, -1, "%s %s: ignored a torn or corrupt tail of %zu bytes at offset %zu", what, path,
             file.len - off, off);
  wxd_logf(WXD_LOG_INFO, -1, "%s %s: replayed %zu records", what, path, nrec);
  wxd_buf_free(&file);
  wxd_buf_t out = {0};
  pthread_mutex_lock(mu);
  int rc = dump(ctx, &out);
  pthread_mutex_unlock(mu);
  if (rc != 0) {
    wxd_buf_free(&out);
    snprintf(err, errlen, "%s %s: out of memory", what, path);
    goto fail;
  }
  int e = rewrite(path, &out, &j->fd);
  j->file_bytes = j->alloc_end = out.len;
  if (!e) prealloc(j);
  j->compact_min = 4u << 20;
  j->compact_bytes = next_compaction(j, out.len);
  wxd_buf_free(&out);
  if (e) {
    snprintf(err, errlen, "%s %s: compaction failed: %s", what, path, strerror(e));
    goto fail;
  }
  pthread_t thread;
  if ((e = pthread_create(&thread, NULL, writer_main, j)) != 0) {
    snprintf(err, errlen, "%s %s: thread: %s", what, path, strerror(e));
    close(j->fd);
    j->fd = -1;
    goto fail;
  }
  pthread_detach(thread);
  return 0;
fail:
  wxd_buf_free(&file);
  free(j->path);
  j->path = NULL;
  pthread_cond_destroy(&j->work);
  pthread_cond_destroy(&j->durable_cv);
  return -1;
}
