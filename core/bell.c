/* bell: see bell.h. */
#include "bell.h"

#include <stddef.h>

/* Items run per callback before the rest is left to the next loop turn, so
 * that a thread posting without pause cannot hold the loop here. */
#define RUNS_PER_TURN 4096

static wxd_bell_item_t *pop_locked(wxd_bell_t *b) {
  wxd_bell_item_t *it = b->head;
  if (!it) return NULL;
  b->head = it->next;
  if (b->head) b->head->prev = NULL;
  else b->tail = NULL;
  it->prev = it->next = NULL;
  it->queued = 0;
  return it;
}

static void on_ring(uv_async_t *a) {
  wxd_bell_t *b = a->data;
  int n = 0;
  for (;;) {
    pthread_mutex_lock(&b->mu);
    wxd_bell_item_t *it = n < RUNS_PER_TURN ? pop_locked(b) : NULL;
    int more = n >= RUNS_PER_TURN && b->head && b->open;
    if (n == 0 && it) b->runs++;
    pthread_mutex_unlock(&b->mu);
    if (more) uv_async_send(&b->async);
    if (!it) return;
    n++;
    /* One at a time: an item run here may resume a coroutine whose end
     * takes another queued item back (wxd_bell_unpost). */
    it->run(it);
  }
}

int wxd_bell_open(wxd_bell_t *b, uv_loop_t *loop) {
  *b = (wxd_bell_t){0};
  int rc = uv_async_init(loop, &b->async, on_ring);
  if (rc != 0) return rc;
  b->async.data = b;
  uv_unref((uv_handle_t *)&b->async);
  pthread_mutex_init(&b->mu, NULL);
  b->open = 1;
  return 0;
}

void wxd_bell_close(wxd_bell_t *b) {
  pthread_mutex_lock(&b->mu);
  int was_open = b->open;
  b->open = 0;
  pthread_mutex_unlock(&b->mu);
  /* Under no lock: a poster checks `open` under the mutex before it sends,
   * and sends before it lets go of it, so none is inside uv_async_send. */
  if (was_open && !uv_is_closing((uv_handle_t *)&b->async)) uv_close((uv_handle_t *)&b->async, NULL);
}

void wxd_bell_destroy(wxd_bell_t *b) { pthread_mutex_destroy(&b->mu); }

int wxd_bell_post(wxd_bell_t *b, wxd_bell_item_t *it) {
  pthread_mutex_lock(&b->mu);
  if (!b->open) {
    pthread_mutex_unlock(&b->mu);
    return -1;
  }
  if (it->queued) { /* posted again before it ran: it runs once, as an async's sends do */
    pthread_mutex_unlock(&b->mu);
    return 0;
  }
  it->next = NULL;
  it->prev = b->tail;
  if (b->tail) b->tail->next = it;
  else b->head = it;
  b->tail = it;
  it->queued = 1;
  b->posted++;
  uv_async_send(&b->async);
  pthread_mutex_unlock(&b->mu);
  return 0;
}

void wxd_bell_unpost(wxd_bell_t *b, wxd_bell_item_t *it) {
  pthread_mutex_lock(&b->mu);
  if (it->queued) {
    if (it->prev) it->prev->next = it->next;
    else b->head = it->next;
    if (it->next) it->next->prev = it->prev;
    else b->tail = it->prev;
    it->prev = it->next = NULL;
    it->queued = 0;
  }
  pthread_mutex_unlock(&b->mu);
}

void wxd_bell_expect(wxd_bell_t *b) {
  if (b->expected++ == 0 && !uv_is_closing((uv_handle_t *)&b->async)) uv_ref((uv_handle_t *)&b->async);
}

void wxd_bell_settle(wxd_bell_t *b) {
  if (b->expected > 0 && --b->expected == 0 && !uv_is_closing((uv_handle_t *)&b->async))
    uv_unref((uv_handle_t *)&b->async);
}
