/* shdict: named dictionaries shared by every worker thread of the process.
 *
 * A dictionary maps string keys to copies of strings, numbers or booleans
 * (a type tag says which), each with an optional TTL, under a byte budget.
 * When a write does not fit, expired entries are reclaimed first (a min-heap
 * of deadlines), then the least recently used entries are evicted (a doubly
 * linked list, most recent at the head). Expired entries are also dropped
 * when a lookup meets them. Every dictionary has its own mutex. No Lua API
 * is called while a mutex is held: an allocation there may run a finalizer
 * that uses the same dictionary, or raise and leave the mutex locked.
 *
 * Ownership: a registry owns its dictionaries, a dictionary owns its
 * entries, and freeing the registry frees everything. In a server the main
 * thread creates the registry from config (the `shdict` section) before the
 * workers start; the registry is read-only from then on, reachable from
 * every VM of every generation through vm->shdicts (so the data survives hot
 * reloads), and freed after the workers are joined. Outside a server (wxd
 * script, wxd check) a VM gets a private registry on first use, freed with
 * its Lua state; only there may Lua declare dictionaries.
 *
 * Locks (lua/wxd/lock.lua) are entries whose value is the holder's random
 * token. A waiter yields its coroutine and is queued on the dictionary;
 * removing the key (unlock, delete, eviction, expiry, flush) wakes the first
 * waiter of that key through a uv_async_t on the waiter's own loop, and a
 * waiter's timer also fires when the holder's lock expires or the wait
 * times out. Nothing polls.
 */
#ifndef WXD_SHDICT_H
#define WXD_SHDICT_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#define WXD_SHDICT_MIN_BYTES ((size_t)64 * 1024)     /* smallest capacity */
#define WXD_SHDICT_MAX_BYTES ((size_t)1 << 40)       /* largest capacity */
#define WXD_SHDICT_KEY_MAX 65535                     /* bytes in a key */

typedef struct wxd_shdict wxd_shdict_t;
typedef struct wxd_shdict_registry wxd_shdict_registry_t;

/* An empty registry, or NULL when out of memory. */
wxd_shdict_registry_t *wxd_shdict_registry_new(void);
/* Adds a dictionary of `cap` bytes. Only before other threads can see the
 * registry (or in a single-threaded process). Returns 0, or -1 with err set
 * (duplicate name, bad name or size, out of memory). */
int wxd_shdict_registry_add(wxd_shdict_registry_t *reg, const char *name, size_t cap, char *err,
                            size_t errlen);
/* The dictionary called `name`, or NULL. */
wxd_shdict_t *wxd_shdict_find(const wxd_shdict_registry_t *reg, const char *name, size_t len);
/* One dictionary's numbers at one moment (read under its lock). */
typedef struct wxd_shdict_usage {
  const char *name;
  size_t capacity, used, count;
  uint64_t evictions, expired;
} wxd_shdict_usage_t;
/* Calls fn for every dictionary, in registration order (metrics). */
void wxd_shdict_registry_each(const wxd_shdict_registry_t *reg, void (*fn)(void *arg, const wxd_shdict_usage_t *u),
                              void *arg);
/* Frees every dictionary and entry. No thread may use the registry any more,
 * and no lock waiter may be queued (their loops have ended). */
void wxd_shdict_registry_free(wxd_shdict_registry_t *reg);

/* SipHash-1-3 of `data` under key `k`: for hash tables whose keys may come
 * from clients (who must not be able to pick colliding ones). */
uint64_t wxd_siphash13(const uint64_t k[2], const void *data, size_t len);

/* Lua module wxd.core.shdict (lua/wxd/shdict.lua and lock.lua wrap it). */
int wxd_open_shdict(lua_State *L);

#endif
