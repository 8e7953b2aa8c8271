/* server: worker threads, listeners, signals, start-up and shutdown.
 *
 * One process runs N workers. Each worker owns a libuv loop, the VM of the
 * current app generation, and its own listening socket bound with
 * SO_REUSEPORT, so the kernel spreads connections and nothing Lua crosses
 * threads. The main thread handles signals, coordinates start-up, reloads
 * (reload.c) and shutdown, and serves the optional status endpoint.
 */
#ifndef WXD_SERVER_H
#define WXD_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "bell.h"
#include "buf.h"
#include "config.h"
#include "log.h"
#include "steer.h"
#include "vm.h"

struct wxd_conn;
typedef struct wxd_server wxd_server_t;

/* Counters the main thread reads for the status endpoint. */
typedef struct wxd_worker_stats {
  atomic_uint_fast64_t requests;
  atomic_uint in_flight; /* requests in their handler (metrics on); only the worker writes it */
  atomic_uint connections;
  atomic_uint generation;
  atomic_uint retired; /* replaced generations still finishing requests */
  atomic_uint busy_permille; /* share of the last second the loop was not idle */
  atomic_uint paused_for_output; /* connections held until their client reads */
} wxd_worker_stats_t;

typedef struct wxd_worker {
  int id;
  const wxd_config_t *cfg;
  wxd_server_t *srv;
  uv_loop_t loop;
  uv_tcp_t listener;        /* plain HTTP (bound unless cfg->plain is 0) */
  uv_tcp_t https_listener;  /* HTTPS, when cfg->https.enabled */
  struct ssl_ctx_st *tls_ctx; /* HTTPS: this worker's reference to the context
                               * new connections use; a reload swaps it */
  char *tls_scratch;        /* HTTPS: ciphertext on its way to the socket */
  uv_async_t stop_async;    /* main thread asks us to drain */
  uv_async_t ctl_async;     /* main thread's reload commands */
  wxd_bell_t bell;          /* other threads' finished waits (journal commits) */
  int bell_ok;              /* bell opened: VMs use it */
  uv_timer_t tick;          /* connection timeouts, access log flush */
  uv_timer_t deadline;      /* shutdown grace period */
  uv_thread_t thread;
  wxd_vm_t *vm;             /* the current generation: new requests go here */
  wxd_vm_t *next_vm;        /* a prepared generation awaiting commit */
  wxd_vm_t *retired;        /* replaced generations still finishing requests */
  int ctl_cmd;              /* WXD_CTL_*, guarded by srv->reload.mu */
  int reload_waiting;       /* its answer to the current phase is awaited (reload.mu) */
  char prep_error[2048];    /* why preparing failed, guarded by srv->reload.mu */
  struct wxd_conn *conns;   /* every open connection */
  unsigned nconns;
  int draining;
  int trim_wanted;          /* memory to give back on the next tick */
  int stopping;             /* handles are being closed */
  char *readbuf;            /* shared by all reads of this loop */
  size_t readbuf_size;
  int readbuf_busy;
  wxd_buf_t out;            /* response assembly scratch */
  wxd_logbuf_t access;      /* buffered access log */
  char date_hdr[64];        /* "Date: ...\r\n" */
  size_t date_len;
  int64_t date_sec;
  char ts_prefix[32];       /* "2026-11-26T10:00:00" for the access log */
  int64_t ts_sec;
  uint32_t id_prefix;       /* random per worker: request ids differ per run */
  uint64_t seq;             /* requests seen */
  int load_status;          /* 0 ok, -1 failed; set before the start barrier */
  char load_error[2048];
  wxd_worker_stats_t stats;
  wxd_steer_meter_t meter;  /* feeds stats.busy_permille */
  unsigned ticks;
  struct wxd_fetch_pool *fetch; /* outbound connections, shared by the generations */
  struct wxd_redis_pool *redis; /* Redis connections, shared by the generations */
  /* Watchdog (watchdog.c). The worker's tick publishes beat_ns; the main
   * thread reads it, and pokes a stuck worker with a signal whose handler
   * (on the worker's thread) describes what runs into stall_desc. */
  atomic_uint_fast64_t beat_ns; /* uv_hrtime of the last tick; 0: not watched */
  atomic_uint_fast64_t progress; /* coroutine resumes that returned (vm.c) */
  uint64_t seen_progress;       /* main: progress at its last look */
  uint64_t alive_ns;            /* main: when it last saw progress move */
  uint64_t seen_beat;           /* main: beat_ns at its last look */
  uint64_t cpu_at_alive;        /* main: the thread's CPU time when last seen alive (0: unknown) */
  atomic_uint pokes;            /* main: signals sent */
  atomic_uint described;        /* handler: the poke stall_desc answers */
  char stall_desc[512];         /* JSON fragment: what the stuck loop runs */
  volatile int stall_interrupted; /* handler: a hook will stop the coroutine */
  int stalled;                  /* main: stuck now (contained) */
  int abandoned;                /* main: a reload or stop went on without it */
  uint64_t stall_began_ns;      /* main: the last beat before the stall */
  unsigned stalls;              /* main: times this worker got stuck */
  pthread_mutex_t listen_mu;    /* the main thread drains the listeners' queues */
  int listeners_closed;         /* under listen_mu */
  uv_async_t adopt_async;       /* connections taken from a stuck worker */
  pthread_mutex_t adopt_mu;
  int *adopt;                   /* fd * 2 + tls, under adopt_mu */
  int nadopt, adopt_cap;
  int exited;                   /* its thread ended (server.c exited_mu) */
} wxd_worker_t;

enum { WXD_CTL_NONE = 0, WXD_CTL_PREPARE, WXD_CTL_COMMIT, WXD_CTL_ABORT };

/* Reload bookkeeping; every field is guarded by mu. */
typedef struct wxd_reload_state {
  pthread_mutex_t mu;
  int phase;             /* 0 idle, 1 preparing, 2 committing or aborting */
  int replies;           /* workers that answered the current phase */
  int expected;          /* workers asked (stuck ones are not) */
  int verdict_ok;        /* decision of phase 2 */
  int pending;           /* another reload was asked for meanwhile */
  uint64_t started_ns;
  char why[64];          /* what triggered it: SIGHUP, file change */
  char restart_needed[256]; /* config keys changed that only a restart applies */
  unsigned generation;   /* the generation serving now */
  unsigned attempts, succeeded, failed;
  char loaded_at[40];    /* when the serving generation was loaded */
  double last_ms;        /* duration of the last attempt */
  int last_ok;
  char last_error[2048]; /* the most recent refusal, kept after later successes */
  char last_error_at[40];
} wxd_reload_state_t;

struct wxd_server {
  wxd_config_t *cfg;
  wxd_worker_t *workers;
  int n;
  uv_loop_t *loop;             /* the main thread's loop */
  uv_signal_t sigint, sigterm, sighup;
  uv_async_t worker_exited;    /* a worker's loop ended */
  uv_async_t reload_async;     /* a worker answered a reload phase */
  uv_tcp_t admin;              /* status endpoint, when configured */
  int admin_open;
  struct admin_conn *admin_conns; /* open status connections (reload.c) */
  uv_timer_t watch_debounce;   /* wxd dev: coalesces bursts of file events */
  struct wxd_watch *watches;   /* wxd dev: one fs_event per directory */
  int signals;
  int stopping;
  wxd_reload_state_t reload;
  struct wxd_shdict_registry *shdicts; /* created before the workers, freed after */
  struct wxd_ws_topics *ws_topics;     /* WebSocket topics (ws.h): likewise */
  struct ssl_ctx_st *tls_next; /* HTTPS context a reload prepared; guarded by reload.mu */
  wxd_steer_t steer;           /* which worker gets a new connection (main thread) */
  struct wxd_watchdog *watchdog; /* stuck workers (watchdog.c) */
  struct wxd_restart *restart; /* a successor process (restart.c) */
  uv_signal_t sigusr2;         /* graceful restart in place */
  uv_timer_t abandon_timer;    /* stopping: do not wait for a stuck worker forever */
  char **argv;                 /* the command line, for a successor */
  int handed_over;             /* pid of the successor that serves now (restart.c) */
};

/* Runs the server until SIGTERM/SIGINT; returns the process exit code,
 * WXD_SERVER_APP_FAILED when the app did not load at start-up (nothing was
 * served; `wxd dev` then waits for a change and runs it again).
 * argv (NULL-terminated, argv[0] the binary) starts a successor on a
 * graceful restart. */
#define WXD_SERVER_APP_FAILED 3
int wxd_server_run(wxd_config_t *cfg, char **argv);
/* Main thread: stops the server as on SIGTERM (why is logged). */
void wxd_server_stop(wxd_server_t *s, const char *why);

/* Creates a VM for worker w and loads the app into it, as generation gen.
 * Returns NULL with err set when loading fails. */
wxd_vm_t *wxd_worker_load(wxd_worker_t *w, unsigned gen, char *err, size_t errlen);

/* The HTTPS context of cfg->https (certificate, key, client CA read now),
 * or NULL with err set ("https: ..." naming the file). The passphrase in
 * cfg is wiped either way. */
struct ssl_ctx_st *wxd_https_ctx(wxd_https_conf_t *h, char *err, size_t errlen);

/* The cached "Date: ...\r\n" header line for this second. */
const char *wxd_worker_date(wxd_worker_t *w, size_t *len);

#endif
