/* steer: see steer.h. */
#include "steer.h"

#include <errno.h>
#include <linux/filter.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"

#define SATURATED 900   /* permille busy: a worker that cannot take more */
#define QUIET 500       /* permille busy: every worker has room again */
#define HOT_SECONDS 3
#define CALM_SECONDS 30
#define IDLE_CPU 0.75   /* idle CPUs (fraction of one) that make spreading worth it */

int wxd_steer_parse(const char *s) {
  if (!s) return -1;
  if (strcmp(s, "auto") == 0) return WXD_STEER_AUTO;
  if (strcmp(s, "cpu") == 0) return WXD_STEER_CPU;
  if (strcmp(s, "hash") == 0) return WXD_STEER_HASH;
  return -1;
}

const char *wxd_steer_name(int mode) {
  return mode == WXD_STEER_CPU ? "cpu" : mode == WXD_STEER_HASH ? "hash" : "auto";
}

int wxd_steer_wanted(int mode, int nworkers) {
  return mode != WXD_STEER_HASH && nworkers >= 2 && (unsigned)nworkers <= uv_available_parallelism();
}

int wxd_steer_set(uv_os_fd_t fd, int nworkers, int by_cpu) {
  if (!by_cpu) {
    int dummy = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, &dummy, sizeof dummy) != 0 && errno != ENOENT)
      return -errno;
    return 0;
  }
  /* A = the CPU that runs this (the SYN's softirq); return A % workers: the
   * index of the socket in the group, in bind order. */
  struct sock_filter code[] = {
      {BPF_LD | BPF_W | BPF_ABS, 0, 0, (uint32_t)(SKF_AD_OFF + SKF_AD_CPU)},
      {BPF_ALU | BPF_MOD | BPF_K, 0, 0, (uint32_t)nworkers},
      {BPF_RET | BPF_A, 0, 0, 0},
  };
  struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
  if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog) != 0) return -errno;
  return 0;
}

/* The program of a group with exclusions: by CPU (cpu % workers) when
 * asked and that socket is not excluded, else a random socket among the
 * others. Jumps of classic BPF reach 255 instructions ahead: past 100
 * exclusions the CPU part is left out. */
static int set_program(wxd_steer_t *s, uv_os_fd_t fd, int by_cpu) {
  if (s->nexcluded == 0) return wxd_steer_set(fd, s->nworkers, by_cpu);
  static struct sock_filter code[3 + 256 + 1 + 2 + 2 * 256 + 1];
  int healthy[256], h = 0, n = 0;
  for (int i = 0; i < s->nworkers; i++)
    if (!s->excluded[i]) healthy[h++] = i;
  if (h == 0) return -EINVAL;
  if (by_cpu && s->nexcluded <= 100) {
    code[n++] = (struct sock_filter){BPF_LD | BPF_W | BPF_ABS, 0, 0, (uint32_t)(SKF_AD_OFF + SKF_AD_CPU)};
    code[n++] = (struct sock_filter){BPF_ALU | BPF_MOD | BPF_K, 0, 0, (uint32_t)s->nworkers};
    int left = s->nexcluded;
    for (int i = 0; i < s->nworkers; i++) {
      if (!s->excluded[i]) continue;
      left--;
      /* Past the checks left and the return below: the random part. */
      code[n++] = (struct sock_filter){BPF_JMP | BPF_JEQ | BPF_K, (uint8_t)(left + 1), 0, (uint32_t)i};
    }
    code[n++] = (struct sock_filter){BPF_RET | BPF_A, 0, 0, 0};
  }
  code[n++] = (struct sock_filter){BPF_LD | BPF_W | BPF_ABS, 0, 0, (uint32_t)(SKF_AD_OFF + SKF_AD_RANDOM)};
  code[n++] = (struct sock_filter){BPF_ALU | BPF_MOD | BPF_K, 0, 0, (uint32_t)h};
  for (int i = 0; i < h; i++) {
    code[n++] = (struct sock_filter){BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (uint32_t)i};
    code[n++] = (struct sock_filter){BPF_RET | BPF_K, 0, 0, (uint32_t)healthy[i]};
  }
  code[n++] = (struct sock_filter){BPF_RET | BPF_K, 0, 0, (uint32_t)healthy[0]};
  struct sock_fprog prog = {.len = (unsigned short)n, .filter = code};
  if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog) != 0) return -errno;
  return 0;
}

int wxd_steer_exclude(wxd_steer_t *s, int worker, int excluded) {
  if (worker < 0 || worker >= s->nworkers || s->nworkers < 2) return -EINVAL;
  if (!!s->excluded[worker] == !!excluded) return 0;
  if (excluded && s->nexcluded + 1 >= s->nworkers) return -EINVAL; /* someone must take them */
  s->excluded[worker] = excluded ? 1 : 0;
  s->nexcluded += excluded ? 1 : -1;
  int rc = 0;
  for (int i = 0; i < 2; i++) {
    if (s->fds[i] < 0) continue;
    int r = set_program(s, s->fds[i], s->by_cpu);
    if (r != 0) rc = r;
  }
  if (rc != 0) {
    s->excluded[worker] = excluded ? 0 : 1;
    s->nexcluded += excluded ? -1 : 1;
  }
  s->program_on = s->by_cpu || s->nexcluded > 0;
  return rc;
}

void wxd_steer_release(wxd_steer_t *s) {
  for (int i = 0; i < 2; i++)
    if (s->fds[i] >= 0) wxd_steer_set(s->fds[i], s->nworkers, 0);
  s->by_cpu = 0;
  s->program_on = 0;
  s->nexcluded = 0;
  memset(s->excluded, 0, sizeof s->excluded);
  s->fds[0] = s->fds[1] = -1;
}

int wxd_steer_loop_init(uv_loop_t *loop) { return uv_loop_configure(loop, UV_METRICS_IDLE_TIME); }

unsigned wxd_steer_busy_permille(uv_loop_t *loop, wxd_steer_meter_t *m) {
  uint64_t now = uv_hrtime(), idle = uv_metrics_idle_time(loop);
  uint64_t dt = now - m->last_ns, di = idle - m->last_idle_ns;
  m->last_ns = now;
  m->last_idle_ns = idle;
  if (dt == 0 || dt == now) return 0; /* the first sample */
  if (di > dt) di = dt;
  return (unsigned)((dt - di) * 1000 / dt);
}

/* Idle CPUs (in CPUs) since the last sample, from /proc/stat; -1 when it
 * cannot be read (then auto never spreads: nothing to go by). */
static double idle_cpus(wxd_steer_t *s, double seconds) {
  FILE *f = fopen("/proc/stat", "r");
  if (!f) return -1;
  unsigned long long v[10] = {0};
  int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                 &v[5], &v[6], &v[7], &v[8], &v[9]);
  fclose(f);
  if (n < 5) return -1;
  uint64_t total = 0;
  for (int i = 0; i < 8 && i < n; i++) total += v[i]; /* guest time is already in user */
  uint64_t idle = v[3] + v[4];
  double out = -1;
  if (s->cpu_total && total > s->cpu_total && seconds > 0) {
    /* /proc/stat counts in clock ticks: idle ticks per second / ticks per
     * second = idle CPUs. iowait may go backwards (proc(5)): no idle then,
     * not 2^64 ticks of it. */
    long hz = sysconf(_SC_CLK_TCK);
    uint64_t di = idle > s->cpu_idle ? idle - s->cpu_idle : 0;
    if (di > total - s->cpu_total) di = total - s->cpu_total;
    out = (double)di / (double)(hz > 0 ? hz : 100) / seconds;
  }
  s->cpu_total = total;
  s->cpu_idle = idle;
  return out;
}

static void apply(wxd_steer_t *s, int by_cpu, const char *why, unsigned busiest, int worker, double idle) {
  for (int i = 0; i < 2; i++) {
    if (s->fds[i] < 0) continue;
    int rc = set_program(s, s->fds[i], by_cpu);
    if (rc != 0) {
      wxd_logf(WXD_LOG_WARN, -1, "steering: cannot %s the by-CPU program: %s", by_cpu ? "attach" : "detach",
               strerror(-rc));
      return;
    }
  }
  s->by_cpu = by_cpu;
  s->program_on = by_cpu || s->nexcluded > 0;
  s->switches++;
  char extra[256];
  snprintf(extra, sizeof extra, "\"steering\":\"%s\",\"reason\":\"%s\",\"busiest_worker\":%d,\"busy\":%.2f,"
           "\"idle_cpus\":%.2f",
           by_cpu ? "cpu" : "hash", why, worker, busiest / 1000.0, idle);
  wxd_log(WXD_LOG_INFO, -1, "steering changed", extra);
}

static void on_tick(uv_timer_t *t) {
  wxd_steer_t *s = t->data;
  unsigned busiest = 0, sum = 0;
  int who = 0;
  for (int i = 0; i < s->nworkers; i++) {
    unsigned b = s->busy(s->arg, i);
    sum += b;
    if (b > busiest) busiest = b, who = i;
  }
  /* The time since the last sample, not the nominal second: the main loop
   * may have been held up (a reload reads the config and certificates). */
  uint64_t t_now = uv_now(t->loop);
  double idle = idle_cpus(s, (double)(t_now - s->last_ms) / 1000.0);
  s->last_ms = t_now;
  if (s->by_cpu) {
    s->hot_seconds = (busiest >= SATURATED && idle >= s->idle_needed) ? s->hot_seconds + 1 : 0;
    if (s->hot_seconds >= HOT_SECONDS) {
      apply(s, 0, "a worker is saturated while CPUs are idle", busiest, who, idle);
      s->hot_seconds = 0;
      s->calm_seconds = 0;
    }
  } else {
    /* Steering by CPU may put every new connection on one worker again:
     * only when all the load would fit there with room to spare, or a load
     * between SATURATED and nworkers * QUIET flaps every calm_needed s. */
    s->calm_seconds = sum < QUIET ? s->calm_seconds + 1 : 0;
    if (s->calm_seconds >= s->calm_needed) {
      apply(s, 1, "every worker has room", busiest, who, idle);
      s->calm_seconds = 0;
      s->hot_seconds = 0;
    }
  }
}

int wxd_steer_start(wxd_steer_t *s, uv_loop_t *loop, int mode, int nworkers, uv_os_fd_t plain_fd,
                    uv_os_fd_t https_fd, unsigned (*busy)(void *arg, int worker), void *arg) {
  memset(s, 0, sizeof *s);
  s->mode = mode;
  s->nworkers = nworkers;
  s->fds[0] = plain_fd;
  s->fds[1] = https_fd;
  s->busy = busy;
  s->arg = arg;
  /* The specs shorten the wait (seconds, 1..3600). */
  const char *calm = getenv("WXD_STEERING_CALM_S");
  s->calm_needed = calm && atoi(calm) >= 1 && atoi(calm) <= 3600 ? atoi(calm) : CALM_SECONDS;
  /* And the idle CPU they ask for (a shared test machine has little). */
  const char *idle = getenv("WXD_STEERING_IDLE_CPU");
  s->idle_needed = idle && atof(idle) >= 0 && atof(idle) <= 64 ? atof(idle) : IDLE_CPU;
  uv_timer_init(loop, &s->timer);
  s->timer.data = s;
  s->timer_open = 1;
  if (!wxd_steer_wanted(mode, nworkers)) {
    /* The fds stay: the watchdog steers around a stuck worker. */
    if (mode == WXD_STEER_CPU && nworkers >= 2)
      wxd_logf(WXD_LOG_WARN, -1, "steering: %d workers on %u CPUs: spreading by hash (by CPU, workers beyond "
               "the CPU count would get no connection)", nworkers, uv_available_parallelism());
    return 0;
  }
  for (int i = 0; i < 2; i++) {
    if (s->fds[i] < 0) continue;
    int rc = wxd_steer_set(s->fds[i], nworkers, 1);
    if (rc != 0) {
      wxd_logf(WXD_LOG_WARN, -1, "steering: cannot attach the by-CPU program (%s): spreading by hash",
               strerror(-rc));
      for (int j = 0; j < i; j++)
        if (s->fds[j] >= 0) wxd_steer_set(s->fds[j], nworkers, 0);
      return 0;
    }
  }
  s->by_cpu = 1;
  s->program_on = 1;
  if (mode == WXD_STEER_AUTO) {
    idle_cpus(s, 0); /* the first sample */
    s->last_ms = uv_now(loop);
    uv_timer_start(&s->timer, on_tick, 1000, 1000);
  }
  return 0;
}

void wxd_steer_stop(wxd_steer_t *s) {
  /* Also called when start-up failed before wxd_steer_start (s zeroed). */
  if (!s->timer_open) return;
  s->timer_open = 0;
  /* The workers close their listeners next: hands off the descriptors. */
  s->fds[0] = s->fds[1] = -1;
  uv_close((uv_handle_t *)&s->timer, NULL);
}

const char *wxd_steer_current(const wxd_steer_t *s) { return s->by_cpu ? "cpu" : "hash"; }
