/* paystate: the payment state machine of wxd.order, and its embedded store.
 *
 * The transition table is C data (paystate.c, `legal_to`): Lua never
 * decides legality. Redis mode gets the same table as a string
 * (pairs()) and passes it to its transition script.
 *
 * Embedded store. Orders live in a hash table shared by every worker
 * thread of the process, behind one mutex per store; stores are kept in a
 * process-wide registry keyed by journal path and live until the process
 * ends (so every generation of every worker sees the same orders). Each
 * change is a compare-and-set under the mutex: the idempotency key is
 * looked up in the order's history, legality is checked against the
 * table, and the order's version is bumped, all in one hold.
 *
 * Journal (core/journal.c, shared with wxd.queue's store). Every change is
 * appended to a pending buffer under the same hold and gets a sequence
 * number; a journal thread per store writes what
 * is pending and fdatasyncs it (all changes that arrived during one fsync
 * go out with the next: group commit), then wakes the callers whose
 * sequence is durable. A caller in a wxd coroutine yields meanwhile (a
 * uv_async_t per waiting call, sent by the journal thread); outside one it
 * blocks on a condition variable. Reads and duplicates also wait until the
 * order's last change is durable, so nothing undurable is ever acknowledged.
 * Records are [u32 length][u32 crc32][payload]; at open the journal is
 * replayed up to the first short or corrupt record (a torn tail is logged
 * and ignored) and then compacted: rewritten from memory into a temporary
 * file, fsync'd and renamed over the journal. After a write error the
 * store refuses changes until the process restarts. The order journal is
 * compacted only at open.
 *
 * Retention (forget_due, docs/order.md): an order final or settled for
 * long enough is appended to an archive file (fsync'd), then a FORGET
 * record is queued and the order hidden; its memory is freed once the
 * record is durable. Replay applies FORGET records; the compaction at open
 * leaves the forgotten orders out.
 */
#ifndef WXD_PAYSTATE_H
#define WXD_PAYSTATE_H

#include <lua.h>

/* Lua module wxd.core.order (lua/wxd/order.lua wraps it). */
int wxd_open_order(lua_State *L);

#endif
