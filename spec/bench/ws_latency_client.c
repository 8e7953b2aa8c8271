/* ws_latency_client: publish-to-frame latency of wxd WebSocket topics, measured
 * without the client's own queue in the figure (spec/bench/ws_latency.lua runs it).
 *
 *   ws_latency_client SUB_PORT SUB_PATH PUB_PORT PUB_PATH SUBSCRIBERS PROCESSES ROUNDS [WARM_PATH]
 *
 * The parent forks PROCESSES children; each opens its share of SUBSCRIBERS
 * WebSocket connections to 127.0.0.1:SUB_PORT SUB_PATH and waits for every
 * one's first frame ("subscribed ..."). The parent then GETs WARM_PATH
 * (default PUB_PATH) with "w" appended (warm-up) until every socket has had
 * a frame, then ROUNDS
 * times PUB_PATH with the round number appended, one round at a time (the
 * next once every child has had the round's frame on all its sockets). The
 * route answers {"stamp": <CLOCK_REALTIME µs taken just before it published>}
 * (and optionally "took": µs, what its own call took, e.g. an order
 * transition) and publishes a frame that holds "lat-<round>".
 *
 * Per frame, two clocks (both CLOCK_REALTIME, the clock the server stamps
 * with, shared on one machine):
 *   arrival: the kernel's receive timestamp of the bytes (SO_TIMESTAMPNS):
 *            when the frame reached the client's socket, whatever the client
 *            was doing then;
 *   read:    when the client's recvmsg returned them: arrival plus the
 *            time the client took to come round to that socket.
 * The latency is each minus the round's stamp. Prints one JSON object: the
 * distributions over all frames, per child process, and of each round's
 * last arrival (when the fan-out to all subscribers was complete).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  uint32_t round;
  uint32_t child;
  int64_t arrival_ns, read_ns;
} sample_t;

typedef struct {
  int fd;
  int state; /* 0 handshake, 1 open (before "subscribed"), 2 subscribed */
  int warm;
  size_t have;
  char buf[512];
} sub_t;

static void die(const char *what) {
  fprintf(stderr, "ws_latency_client: %s: %s\n", what, strerror(errno));
  exit(1);
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int tcp_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) die("connect");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static void write_all(int fd, const void *p, size_t n) {
  const char *s = p;
  while (n) {
    ssize_t w = write(fd, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) die("write");
    s += w, n -= (size_t)w;
  }
}

/* ---- a child: subscribers ---- */

static int rounds_total;

static void send_pong(sub_t *s, const uint8_t *p, size_t n) {
  uint8_t f[2 + 4 + 125];
  f[0] = 0x8A;
  f[1] = (uint8_t)(0x80 | n);
  memset(f + 2, 0, 4); /* a zero mask: the payload goes as it is */
  memcpy(f + 6, p, n);
  write_all(s->fd, f, 6 + n);
}

/* The round a frame belongs to: "lat-<n>" in it; 0 for "lat-w" (warm-up),
 * -1 for anything else. */
static int frame_round(const char *p, size_t n) {
  const char *m = memmem(p, n, "lat-", 4);
  if (!m) return -1;
  size_t i = (size_t)(m - p) + 4;
  if (i < n && p[i] == 'w') return 0;
  int r = 0;
  while (i < n && p[i] >= '0' && p[i] <= '9') r = r * 10 + (p[i++] - '0');
  return r;
}

static void child_run(int cid, int port, const char *path, int nsubs, int out) {
  sub_t *subs = calloc((size_t)nsubs, sizeof *subs);
  int *per_round = calloc((size_t)rounds_total + 1, sizeof *per_round);
  sample_t *samples = malloc(sizeof *samples * (size_t)nsubs * (size_t)rounds_total);
  if (!subs || !per_round || !samples) die("malloc");
  size_t nsamples = 0;
  int ep = epoll_create1(0);
  char req[1024];
  int rl = snprintf(req, sizeof req,
                    "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                    path, port);
  for (int i = 0; i < nsubs; i++) {
    sub_t *s = &subs[i];
    s->fd = tcp_connect(port);
    int one = 1;
    if (setsockopt(s->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) != 0) die("SO_TIMESTAMPNS");
    write_all(s->fd, req, (size_t)rl);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) != 0) die("epoll_ctl");
  }
  int subscribed = 0, warmed = 0, rounds_done = 0;
  struct epoll_event evs[256];
  while (rounds_done < rounds_total) {
    int n = epoll_wait(ep, evs, 256, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("epoll_wait");
    for (int e = 0; e < n; e++) {
      sub_t *s = evs[e].data.ptr;
      char cbuf[CMSG_SPACE(sizeof(struct timespec))];
      struct iovec iov = {.iov_base = s->buf + s->have, .iov_len = sizeof s->buf - s->have};
      struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
      ssize_t got = recvmsg(s->fd, &mh, MSG_DONTWAIT);
      int64_t read_ns = now_ns();
      if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (got <= 0) {
        fprintf(stderr, "ws_latency_client: subscriber %d of child %d: connection %s\n", (int)(s - subs), cid,
                got == 0 ? "closed by the server" : strerror(errno));
        exit(1);
      }
      int64_t arrival_ns = 0;
      for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
          struct timespec ts;
          memcpy(&ts, CMSG_DATA(c), sizeof ts);
          arrival_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        }
      s->have += (size_t)got;
      if (s->state == 0) {
        char *end = memmem(s->buf, s->have, "\r\n\r\n", 4);
        if (!end) continue;
        if (strncmp(s->buf, "HTTP/1.1 101", 12) != 0) {
          fprintf(stderr, "ws_latency_client: handshake refused: %.*s\n", (int)s->have, s->buf);
          exit(1);
        }
        size_t hl = (size_t)(end + 4 - s->buf);
        memmove(s->buf, s->buf + hl, s->have - hl);
        s->have -= hl;
        s->state = 1;
      }
      /* Whole frames (the server's are unmasked and small here). */
      for (;;) {
        uint8_t *b = (uint8_t *)s->buf;
        if (s->have < 2) break;
        size_t len = b[1] & 0x7f, off = 2;
        if (len == 126) {
          if (s->have < 4) break;
          len = (size_t)b[2] << 8 | b[3];
          off = 4;
        } else if (len == 127) {
          fprintf(stderr, "ws_latency_client: unexpected large frame\n");
          exit(1);
        }
        if (off + len > sizeof s->buf) {
          fprintf(stderr, "ws_latency_client: frame of %zu bytes is over the buffer\n", len);
          exit(1);
        }
        if (s->have < off + len) break;
        int op = b[0] & 0x0f;
        const char *p = s->buf + off;
        if (op == 0x9) {
          send_pong(s, (const uint8_t *)p, len);
        } else if (op == 0x8) {
          fprintf(stderr, "ws_latency_client: the server closed a subscriber\n");
          exit(1);
        } else if (op == 0x1 && s->state == 1) {
          s->state = 2;
          if (++subscribed == nsubs) write_all(out, "R", 1);
        } else if (op == 0x1) {
          int r = frame_round(p, len);
          if (r == 0 && !s->warm) {
            s->warm = 1;
            if (++warmed == nsubs) write_all(out, "W", 1);
          } else if (r > 0 && r <= rounds_total && warmed == nsubs) {
            samples[nsamples++] = (sample_t){(uint32_t)r, (uint32_t)cid, arrival_ns, read_ns};
            if (++per_round[r] == nsubs) {
              rounds_done++;
              write_all(out, "D", 1);
            }
          }
        }
        memmove(s->buf, s->buf + off + len, s->have - off - len);
        s->have -= off + len;
      }
    }
  }
  uint64_t count = nsamples;
  write_all(out, &count, sizeof count);
  write_all(out, samples, sizeof *samples * nsamples);
  exit(0);
}

/* ---- the parent: publishes, then gathers ---- */

static int pub_fd = -1;

/* A number field of the JSON answer (quoted or not); -1 when absent. */
static int64_t answer_field(const char *body, const char *name) {
  char key[32];
  snprintf(key, sizeof key, "\"%s\":", name);
  const char *p = strstr(body, key);
  if (!p) return -1;
  p += strlen(key);
  while (*p == ' ' || *p == '"') p++;
  return (int64_t)strtoll(p, NULL, 10);
}

/* GETs path+tag on the keep-alive connection; returns the "stamp" of the
 * answer (µs) and its "took" in *took (-1 when absent), or exits on
 * anything unexpected. */
static int64_t publish(int port, const char *path, const char *tag, int64_t *took) {
  if (pub_fd < 0) pub_fd = tcp_connect(port);
  char req[1024];
  int n = snprintf(req, sizeof req, "GET %s%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", path, tag, port);
  write_all(pub_fd, req, (size_t)n);
  char buf[4096];
  size_t have = 0;
  for (;;) {
    ssize_t got = read(pub_fd, buf + have, sizeof buf - 1 - have);
    if (got <= 0) die("reading the publish answer");
    have += (size_t)got;
    buf[have] = 0;
    char *end = strstr(buf, "\r\n\r\n");
    char *cl = strcasestr(buf, "content-length:");
    if (!end || !cl) continue;
    size_t blen = strtoul(cl + 15, NULL, 10);
    if (have < (size_t)(end + 4 - buf) + blen) continue;
    if (strncmp(buf, "HTTP/1.1 200", 12) != 0) {
      fprintf(stderr, "ws_latency_client: publish answered %s\n", buf);
      exit(1);
    }
    int64_t stamp = answer_field(end, "stamp");
    if (stamp < 0) {
      fprintf(stderr, "ws_latency_client: no stamp in %s\n", end + 4);
      exit(1);
    }
    if (took) *took = answer_field(end, "took");
    return stamp;
  }
}

/* Waits until every child has said `what` once (children that have
 * stay unread meanwhile); with timeout_ms > 0, returns 0 when that passes
 * first (what was heard is kept for the next call), 1 when all have. */
static int *heard;

static int wait_children(struct pollfd *pf, int k, char what, int timeout_ms) {
  for (;;) {
    int missing = 0;
    for (int i = 0; i < k; i++) {
      pf[i].events = heard[i] ? 0 : POLLIN;
      missing += !heard[i];
    }
    if (!missing) break;
    int n = poll(pf, (nfds_t)k, timeout_ms > 0 ? timeout_ms : -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("poll");
    if (n == 0) return 0;
    for (int i = 0; i < k; i++) {
      if (heard[i] || !(pf[i].revents & (POLLIN | POLLHUP))) continue;
      char c;
      ssize_t r = read(pf[i].fd, &c, 1);
      if (r <= 0) {
        fprintf(stderr, "ws_latency_client: child %d ended early\n", i);
        exit(1);
      }
      if (c != what) {
        fprintf(stderr, "ws_latency_client: child %d said 0x%02x, expected %c\n", i, (unsigned char)c, what);
        exit(1);
      }
      heard[i] = 1;
    }
  }
  memset(heard, 0, sizeof *heard * (size_t)k);
  return 1;
}

static void read_all(int fd, void *p, size_t n) {
  char *s = p;
  while (n) {
    ssize_t r = read(fd, s, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) die("reading samples");
    s += r, n -= (size_t)r;
  }
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* {"n":..,"p50":..,"p90":..,"p99":..,"max":..} in ms; sorts v. */
static void print_dist(const char *name, double *v, size_t n, const char *sep) {
  qsort(v, n, sizeof *v, cmp_d);
#define Q(p) (n ? v[(size_t)((double)(n - 1) * (p) + 0.5)] : 0)
  printf("\"%s\":{\"n\":%zu,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f}%s", name, n, Q(0.5), Q(0.9),
         Q(0.99), n ? v[n - 1] : 0, sep);
#undef Q
}

int main(int argc, char **argv) {
  if (argc != 8 && argc != 9) {
    fprintf(stderr, "usage: %s SUB_PORT SUB_PATH PUB_PORT PUB_PATH SUBSCRIBERS PROCESSES ROUNDS [WARM_PATH]\n",
            argv[0]);
    return 2;
  }
  int sub_port = atoi(argv[1]), pub_port = atoi(argv[3]);
  const char *sub_path = argv[2], *pub_path = argv[4], *warm_path = argc == 9 ? argv[8] : pub_path;
  int nsubs = atoi(argv[5]), k = atoi(argv[6]);
  rounds_total = atoi(argv[7]);
  if (nsubs < 1 || k < 1 || k > nsubs || rounds_total < 1) {
    fprintf(stderr, "ws_latency_client: bad counts\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  const char *sched = getenv("WS_CLIENT_SCHED");
  int batch = sched && strcmp(sched, "batch") == 0; /* clients that never preempt the server */
  struct pollfd *pf = calloc((size_t)k, sizeof *pf);
  pid_t *pids = calloc((size_t)k, sizeof *pids);
  for (int i = 0; i < k; i++) {
    int p[2];
    if (pipe(p) != 0) die("pipe");
    int share = nsubs / k + (i < nsubs % k);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      close(p[0]);
      alarm(300); /* never outlive a stuck run */
      if (batch) {
        struct sched_param sp = {.sched_priority = 0};
        if (sched_setscheduler(0, SCHED_BATCH, &sp) != 0) die("SCHED_BATCH");
      }
      child_run(i, sub_port, sub_path, share, p[1]);
    }
    close(p[1]);
    pids[i] = pid;
    pf[i] = (struct pollfd){.fd = p[0], .events = POLLIN};
  }
  alarm(300);
  heard = calloc((size_t)k, sizeof *heard);
  wait_children(pf, k, 'R', 0);
  /* Subscriptions through Redis become active asynchronously: publish until
   * every socket has had a frame, then let stragglers of the warm-up pass. */
  while (!wait_children(pf, k, 'W', 100)) publish(pub_port, warm_path, "w", NULL);
  usleep(500 * 1000);
  int64_t *stamp_ns = calloc((size_t)rounds_total + 1, sizeof *stamp_ns);
  double *took = calloc((size_t)rounds_total, sizeof *took);
  size_t ntook = 0;
  for (int r = 1; r <= rounds_total; r++) {
    char tag[16];
    snprintf(tag, sizeof tag, "%d", r);
    int64_t t;
    stamp_ns[r] = publish(pub_port, pub_path, tag, &t) * 1000;
    if (t >= 0) took[ntook++] = (double)t / 1e3;
    wait_children(pf, k, 'D', 0);
  }
  size_t total = (size_t)nsubs * (size_t)rounds_total, nall = 0;
  sample_t *all = malloc(sizeof *all * total);
  size_t *first = calloc((size_t)k + 1, sizeof *first);
  for (int i = 0; i < k; i++) {
    uint64_t count;
    read_all(pf[i].fd, &count, sizeof count);
    if (nall + count > total) {
      fprintf(stderr, "ws_latency_client: too many samples\n");
      return 1;
    }
    read_all(pf[i].fd, all + nall, sizeof *all * count);
    first[i] = nall;
    nall += count;
    first[i + 1] = nall;
    waitpid(pids[i], NULL, 0);
  }
  double *arr = malloc(sizeof *arr * nall), *rd = malloc(sizeof *rd * nall);
  double *last = calloc((size_t)rounds_total, sizeof *last);
  for (size_t i = 0; i < nall; i++) {
    int64_t s = stamp_ns[all[i].round];
    arr[i] = (double)(all[i].arrival_ns - s) / 1e6;
    rd[i] = (double)(all[i].read_ns - s) / 1e6;
    if (arr[i] > last[all[i].round - 1]) last[all[i].round - 1] = arr[i];
  }
  printf("{\"subscribers\":%d,\"processes\":%d,\"rounds\":%d,", nsubs, k, rounds_total);
  printf("\"per_process\":[");
  for (int i = 0; i < k; i++) {
    size_t n = first[i + 1] - first[i];
    printf("{");
    print_dist("arrival", arr + first[i], n, ",");
    print_dist("read", rd + first[i], n, "");
    printf("}%s", i + 1 < k ? "," : "");
  }
  printf("],");
  print_dist("round_last_arrival", last, (size_t)rounds_total, ",");
  if (ntook) print_dist("took", took, ntook, ",");
  print_dist("arrival", arr, nall, ",");
  print_dist("read", rd, nall, "");
  printf("}\n");
  return 0;
}
