/* journal: an append-only, fsync'd record log with a writer thread.
 *
 * The owner (a store shared by the workers, e.g. queue.c) keeps its state in
 * memory behind its own mutex and describes every change as a record. It
 * appends the record to `j->pending` under that mutex, in the same hold as
 * the change, and calls wxd_journal_queued() for the record's sequence
 * number. A writer thread per journal writes what is pending and
 * fdatasyncs it (changes arriving during one fsync go out together with the
 * next: group commit), then wakes the callers waiting for their sequence:
 * wxd_journal_sync() yields a wxd coroutine until then (the writer hands
 * the waiters of a commit to their loops' bells: one wake-up per loop and
 * commit) or blocks outside one (or where the VM has no bell).
 *
 * Format: records [u32 length][u32 CRC-32][payload], little-endian. At open
 * the file is replayed through the owner's callback up to the first short
 * or corrupt record (a torn write at a crash: logged and dropped), then
 * compacted: the owner dumps its state as records into PATH.tmp, which is
 * fsync'd and renamed over the journal (and the directory fsync'd). While
 * running, once the file has grown past `compact_bytes` (4 times its size
 * after the last compaction, at least `compact_min`, 4 MiB by default), the
 * writer compacts again instead of appending: the dump is
 * taken under the owner's mutex, so it holds every change up to that point
 * and the pending records are dropped. After a failed write or fsync the
 * journal refuses changes (io_errno) until the process restarts.
 *
 * The file keeps 4 MiB of zero-filled, synced space after its last record,
 * and commits overwrite it (pwrite at their offset): the file's size and
 * block map are on disk already, so a commit's fdatasync writes the data
 * alone (one device write instead of two on ext4). Replay ends at the first
 * zero length; zeros after the last record are that space, not a torn tail.
 *
 * The owner's mutex guards every field below; the writer thread takes it.
 */
#ifndef WXD_JOURNAL_H
#define WXD_JOURNAL_H

#include <lua.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

typedef struct wxd_journal_waiter wxd_journal_waiter_t;

/* Replays one intact record's payload (at file offset `off`); returns 0, or
 * -1 with a message in err (the open fails). */
typedef int (*wxd_journal_replay_fn)(void *ctx, const unsigned char *p, size_t len, size_t off, char *err,
                                     size_t errlen);
/* Appends the owner's whole state as records to out (owner's mutex held);
 * returns 0 or -1 (no memory). */
typedef int (*wxd_journal_dump_fn)(void *ctx, wxd_buf_t *out);

typedef struct wxd_journal {
  const char *what;           /* "queue journal": prefix of logs and errors */
  char *path;                 /* NULL: memory only, every change durable at once */
  pthread_mutex_t *mu;        /* the owner's mutex */
  pthread_cond_t work;        /* the writer waits for pending records */
  pthread_cond_t durable_cv;  /* blocking callers wait for `durable` */
  wxd_buf_t pending;          /* records not yet written */
  uint64_t appended;          /* sequence of the last record */
  uint64_t durable;           /* every record up to this one is on disk */
  int fd;
  int io_errno;               /* a write or fsync failed: changes refused */
  size_t file_bytes;          /* bytes of records in the file: where the next commit goes */
  size_t alloc_end;           /* the file is zero-filled and synced up to here (writer's own) */
  int no_prealloc;            /* zero-filling failed once: commits extend the file */
  size_t compact_bytes;       /* compact when the file grows past this (0: never) */
  size_t compact_min;         /* ... which is max(compact_min, 4 x the last compacted size) */
  wxd_journal_dump_fn dump;
  void *ctx;
  wxd_journal_waiter_t *waiters;
  uint64_t commits, compactions;
} wxd_journal_t;

/* Opens PATH (NULL: memory only): replays it into the owner through
 * `replay`, compacts it through `dump` and starts the writer thread. `mu` is
 * the owner's mutex (not held by the caller). Returns 0, or -1 with err. */
int wxd_journal_open(wxd_journal_t *j, const char *what, const char *path, pthread_mutex_t *mu,
                     wxd_journal_replay_fn replay, wxd_journal_dump_fn dump, void *ctx, char *err, size_t errlen);

/* Records: begin writes the header's room, end fills length and CRC in. */
void wxd_journal_rec_begin(wxd_buf_t *b, size_t *start, int *rc);
void wxd_journal_rec_end(wxd_buf_t *b, size_t start);
/* A record was appended to j->pending (owner's mutex held): its sequence. */
uint64_t wxd_journal_queued(wxd_journal_t *j);
/* Pushes true once every record up to `seq` is durable, or nil,
 * "journal: <error>": yields the calling wxd coroutine meanwhile, or blocks
 * outside one. Owner's mutex not held. */
int wxd_journal_sync(lua_State *L, wxd_journal_t *j, uint64_t seq);

/* The same with the owner's results: once `seq` is durable (err 0) or
 * never will be (err: the errno the journal failed with), push(L, data,
 * err) pushes them on the waiting coroutine and returns their count; when
 * the coroutine goes away first (shutdown), drop(data) runs instead.
 * Exactly one of them runs; both own `data` from this call on. */
typedef int (*wxd_journal_push_fn)(lua_State *L, void *data, int err);
typedef void (*wxd_journal_drop_fn)(void *data);
int wxd_journal_wait(lua_State *L, wxd_journal_t *j, uint64_t seq, wxd_journal_push_fn push,
                     wxd_journal_drop_fn drop, void *data);

/* Appends len bytes to the file at path (created 0600 if missing) and
 * fsyncs it, and its directory when it was created: durable on return 0.
 * A file whose last byte is not a newline (a line torn by a crash) gets
 * one first. On failure (an errno) the file is cut back to its old size.
 * Blocking: for writes rare enough to take on a worker's thread (wxd.order's
 * retention archive). */
int wxd_journal_append_file(const char *path, const void *p, size_t len);

/* Encoding helpers: little-endian integers, strings as u32 length + bytes
 * (NULL as length 0xffffffff). Each ORs -1 into *rc on failure. */
void wxd_jput_u8(wxd_buf_t *b, int v, int *rc);
void wxd_jput_u32(wxd_buf_t *b, uint32_t v, int *rc);
void wxd_jput_i64(wxd_buf_t *b, int64_t v, int *rc);
void wxd_jput_str(wxd_buf_t *b, const char *s, size_t len, int *rc);

typedef struct wxd_jreader {
  const unsigned char *p;
  size_t len, off;
  int bad; /* read past the end */
} wxd_jreader_t;

int wxd_jget_u8(wxd_jreader_t *r);
uint32_t wxd_jget_u32(wxd_jreader_t *r);
int64_t wxd_jget_i64(wxd_jreader_t *r);
/* A string's bytes (not NUL-terminated) and length, or NULL. */
const char *wxd_jget_str(wxd_jreader_t *r, size_t *len);

#endif
