/* steer: which worker a new connection goes to.
 *
 * Every worker has its own SO_REUSEPORT listener. By default the kernel
 * picks one by a hash of the connection's addresses ("hash"). With "cpu", a
 * classic BPF program attached to the group picks the worker numbered after
 * the CPU that processed the connection's SYN (cpu % workers): the worker
 * that serves a connection is the one whose packets arrive on its CPU's
 * queues, and a client that opens all its connections from one CPU (a load
 * generator, a proxy thread on the same host) has them all served by one
 * worker instead of making two workers and itself fight over the cores.
 *
 * The risk of "cpu" is a machine whose network delivers every packet to one
 * CPU (a single-queue NIC without RPS): then one worker gets everything. So
 * the default, "auto", steers by CPU and watches: when one worker has been
 * saturated (busy more than 90% of the time) for 3 seconds while the
 * machine has most of a CPU idle, it detaches the program (new connections
 * are spread by hash); after 30 quiet seconds (all workers together busy
 * less than half of one worker's time: the load fits on one worker) it
 * steers by CPU again. Existing connections stay where
 * they are. Steering is off (hash) when there are more workers than CPUs,
 * since the workers beyond the CPU count would never get a connection.
 *
 * The monitor runs on the main thread's loop; each worker publishes how
 * busy its loop was (uv_metrics_idle_time) from its own tick.
 */
#ifndef WXD_STEER_H
#define WXD_STEER_H

#include <stdint.h>
#include <uv.h>

enum { WXD_STEER_AUTO = 0, WXD_STEER_CPU = 1, WXD_STEER_HASH = 2 };

/* Parses "auto", "cpu" or "hash"; -1 for anything else. */
int wxd_steer_parse(const char *s);
const char *wxd_steer_name(int mode);

/* Whether by-CPU steering applies: not "hash", 2 or more workers, and no
 * more workers than CPUs. */
int wxd_steer_wanted(int mode, int nworkers);

/* Attaches (1) or detaches (0) the by-CPU program on a listener of the
 * group. Returns 0 or a negative errno. */
int wxd_steer_set(uv_os_fd_t fd, int nworkers, int by_cpu);

/* A worker's busy share of its last tick interval, in permille, from the
 * loop's idle-time metric (enable it with wxd_steer_loop_init). */
typedef struct wxd_steer_meter {
  uint64_t last_idle_ns;
  uint64_t last_ns;
} wxd_steer_meter_t;

int wxd_steer_loop_init(uv_loop_t *loop);
unsigned wxd_steer_busy_permille(uv_loop_t *loop, wxd_steer_meter_t *m);

/* The main thread's monitor of "auto" mode. */
typedef struct wxd_steer {
  uv_timer_t timer;
  int timer_open;       /* initialised and not closed yet */
  int mode;             /* WXD_STEER_* as configured */
  int by_cpu;           /* the program is attached */
  int nworkers;
  uv_os_fd_t fds[2];    /* a listener of each group (plain, https); -1: none */
  unsigned (*busy)(void *arg, int worker); /* permille, read by the monitor */
  void *arg;
  int hot_seconds;      /* consecutive seconds of saturation with idle CPU */
  int calm_seconds;     /* consecutive quiet seconds while spread by hash */
  int calm_needed;      /* how many make auto steer by CPU again (30) */
  double idle_needed;   /* idle CPUs that make spreading worth it (0.75) */
  uint64_t cpu_total, cpu_idle; /* last /proc/stat sample (jiffies) */
  uint64_t last_ms;     /* uv_now of that sample */
  unsigned switches;    /* how many times auto changed the steering */
  unsigned char excluded[256]; /* workers that get no new connection (watchdog.c) */
  int nexcluded;
  int program_on;       /* a program is attached to the group(s) */
} wxd_steer_t;

/* Sets up steering for the listeners (fds of -1 are skipped; they must be
 * listening already, and listen()ed in worker order so that a socket's
 * index in its group is its worker's id) and, in auto mode, starts the
 * monitor on loop.
 * Returns 0. */
int wxd_steer_start(wxd_steer_t *s, uv_loop_t *loop, int mode, int nworkers, uv_os_fd_t plain_fd,
                    uv_os_fd_t https_fd, unsigned (*busy)(void *arg, int worker), void *arg);
/* Keeps new connections away from worker `worker` (excluded = 1) or lets
 * them go there again (0): a reuseport program that picks among the other
 * workers' sockets (by CPU as before when that socket is not excluded,
 * else at random). Main thread; needs the fds given to wxd_steer_start
 * (socket index in the group = worker id) and 2 or more workers, and
 * never excludes the last one. Returns 0 or a negative errno. */
int wxd_steer_exclude(wxd_steer_t *s, int worker, int excluded);
/* Detaches every program (the kernel spreads by hash over whatever sockets
 * the group holds: a successor process's joined them). Idempotent. */
void wxd_steer_release(wxd_steer_t *s);
/* Stops the monitor (the timer is closed; s stays valid until then).
 * Idempotent, and a no-op on a zeroed s that was never started. */
void wxd_steer_stop(wxd_steer_t *s);
/* "cpu" or "hash": how new connections are placed now. */
const char *wxd_steer_current(const wxd_steer_t *s);

#endif
