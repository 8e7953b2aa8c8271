/* config: the server's configuration, read from APPDIR/config.lua.
 *
 * The file is validated by lua/wxd/config.lua (errors name the key); this
 * side copies what the C core needs into a plain struct. Parsing lives here,
 * apart from the runtime (server.c) that uses it.
 */
#ifndef WXD_CONFIG_H
#define WXD_CONFIG_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

typedef struct wxd_limits {
  size_t max_header_bytes;       /* request line + headers; 431 beyond */
  size_t max_body_bytes;         /* decoded request body; 413 beyond */
  size_t max_uri_bytes;          /* request target; 414 beyond */
  uint64_t header_timeout_ms;    /* first byte to end of headers; 408 */
  uint64_t body_timeout_ms;      /* end of headers to end of body; 408 */
  uint64_t keepalive_timeout_ms; /* idle time between requests */
  uint64_t shutdown_timeout_ms;  /* in-flight grace period on SIGTERM */
  uint64_t send_timeout_ms;      /* a response makes no progress: close */
  unsigned max_requests;         /* per connection, then Connection: close */
  uint64_t stall_timeout_ms;     /* a worker loop still this long is stuck (watchdog.c) */
  size_t lua_memory_bytes;       /* a generation's Lua state while handlers run (vm.c) */
} wxd_limits_t;

/* One dictionary of the `shdict` section (sizes validated by config.lua). */
#define WXD_SHDICT_MAX 32
typedef struct wxd_shdict_conf {
  char name[64];
  size_t bytes;
} wxd_shdict_conf_t;

/* The `https` section: an HTTPS listener (validated by config.lua; paths
 * made absolute against the app directory). */
typedef struct wxd_https_conf {
  int enabled;
  char host[256];
  int port;
  char cert[PATH_MAX];
  char key[PATH_MAX];
  char client_ca[PATH_MAX]; /* empty: none */
  char passphrase[1024];    /* of the key; wiped once the context is made */
  int has_passphrase;
  int client_verify;        /* WXD_TLS_VERIFY_* (tls.h) */
  int min_version;          /* 12 or 13 */
  char file_listen[300];    /* https.listen as the file says (reload compares) */
} wxd_https_conf_t;

typedef struct wxd_config {
  char app_dir[PATH_MAX];
  char lua_dir[PATH_MAX]; /* empty: rely on package.path */
  char host[256];
  int port;
  int workers;            /* 0: one per CPU */
  int steering;           /* WXD_STEER_* (steer.h): which worker gets a connection */
  int access_log;
  int log_level;
  int metrics;            /* request metrics and GET /metrics (config `metrics`) */
  int trace;              /* trace context per request (config `trace ~= false`) */
  wxd_limits_t limits;
  char admin_host[256];   /* status endpoint; empty: off */
  int admin_port;
  char pid_file[PATH_MAX];/* empty: none */
  int dev;                /* wxd dev: reload when a file changes */
  wxd_shdict_conf_t shdicts[WXD_SHDICT_MAX]; /* `shdict`, sorted by name */
  int nshdicts;
  int plain;              /* 1: the plain HTTP listener is on (listen = false turns it off) */
  wxd_https_conf_t https;
  /* As the file says, before command-line and environment overrides: a
   * reload compares these to tell which changes need a restart. */
  char file_listen[300];
  int file_workers;
  int file_steering;
  char file_admin[300];
} wxd_config_t;

/* Resets what config.lua cannot set (admin off, plain HTTP on, no https or
 * shdict); every other value, defaults included, comes from config.lua's
 * validated table (lua/wxd/config.lua defaults() is their one source). */
void wxd_config_defaults(wxd_config_t *cfg);
/* Parses "HOST:PORT" or "[V6]:PORT". */
int wxd_parse_listen(const char *listen, char *host, size_t hostcap, int *port, char *err,
                     size_t errlen);
int wxd_config_set_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen);
int wxd_config_set_https_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen);
/* Reads cfg->app_dir/config.lua into cfg. Returns 0, or -1 with err set
 * (file and key named). */
int wxd_config_load(wxd_config_t *cfg, char *err, size_t errlen);
/* Applies WXD_LOG_LEVEL and WXD_ACCESS_LOG. */
void wxd_config_apply_env(wxd_config_t *cfg);

#endif
