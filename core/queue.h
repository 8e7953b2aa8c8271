/* queue: the embedded backend of wxd.queue, a durable retry queue shared by
 * every worker of the process.
 *
 * Messages live in C, in named queues kept in a store per journal path (a
 * process-wide registry, like paystate's), behind one mutex. A delivery is
 * a lease: claim() hands the first due message to one caller, marks it in
 * flight until now + visibility and bumps its attempt count; ack() removes
 * it; nack() puts it back with a delay (backoff chosen by the Lua side) or,
 * after max_attempts, moves it to the queue's dead-letter list. A message
 * whose lease expires (a consumer that never answered, or died) is due
 * again: the next claim redelivers it (or kills it, when that was its last
 * attempt). So two workers never hold the same message at once, except
 * after its visibility timeout.
 *
 * Every change is a journal record (core/journal.c): pushes are synced
 * before push returns (wxd.queue waits for the sequence), leases, acks and
 * retries ride along with the next group commit. At start the journal is
 * replayed: messages in flight at a crash are due again at once (at least
 * once), with the attempts that were recorded.
 */
#ifndef WXD_QUEUE_H
#define WXD_QUEUE_H

#include <lua.h>

/* Lua module wxd.core.queue (lua/wxd/queue.lua wraps it). */
int wxd_open_queue(lua_State *L);

#endif
