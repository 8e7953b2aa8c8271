/* bell: other threads hand work to one event loop, with one uv_async_t.
 *
 * A thread that finishes something a coroutine waits for (the journal's
 * writer after an fdatasync; a worker that unlocks or writes a shdict key)
 * posts the waiter's item to the bell of the coroutine's loop; the loop runs the posted items, in order, from one
 * async callback. However many items a batch posts, the loop is woken once
 * (libuv coalesces the sends of one handle), and no handle is made or
 * closed per wait.
 *
 * Threads: post from any thread; everything else on the loop's thread.
 * The bell keeps the loop alive only while someone expects an item
 * (wxd_bell_expect ... wxd_bell_settle), so an idle bell does not keep a
 * script's loop running. An item is owned by its poster's side: the bell
 * only links it. After wxd_bell_close, posts fail (-1) and the owners of
 * items still queued take them back with wxd_bell_unpost.
 *
 * One per worker loop (server.c) and per script loop (main.c); VMs name
 * theirs in vm->bell (NULL where there is none: waits block instead).
 */
#ifndef WXD_BELL_H
#define WXD_BELL_H

#include <pthread.h>
#include <stdint.h>
#include <uv.h>

typedef struct wxd_bell_item wxd_bell_item_t;
struct wxd_bell_item {
  void (*run)(wxd_bell_item_t *it); /* on the loop's thread; may free the item */
  wxd_bell_item_t *prev, *next;
  int queued;                       /* under the bell's mutex */
};

typedef struct wxd_bell {
  uv_async_t async;
  pthread_mutex_t mu;
  wxd_bell_item_t *head, *tail; /* posted, not yet run (mu) */
  int open;                     /* posts accepted (mu) */
  unsigned expected;            /* items someone waits for (loop thread) */
  uint64_t posted, runs;        /* items posted; async callbacks that ran some (mu) */
} wxd_bell_t;

/* 0 or a libuv error. The bell must stay at its address until wxd_bell_destroy. */
int wxd_bell_open(wxd_bell_t *b, uv_loop_t *loop);
/* No more posts; the handle is closed (the loop must run once more). */
void wxd_bell_close(wxd_bell_t *b);
/* After the handle's close completed (the loop ran out): frees the mutex. */
void wxd_bell_destroy(wxd_bell_t *b);
/* Any thread: queues `it` and wakes the loop (an item queued already stays
 * queued once). 0, or -1 when closed. */
int wxd_bell_post(wxd_bell_t *b, wxd_bell_item_t *it);
/* Loop thread: takes back an item that is still queued (its waiter went away). */
void wxd_bell_unpost(wxd_bell_t *b, wxd_bell_item_t *it);
/* Loop thread: an item will be posted (keeps the loop alive) / no longer expected. */
void wxd_bell_expect(wxd_bell_t *b);
void wxd_bell_settle(wxd_bell_t *b);

#endif
