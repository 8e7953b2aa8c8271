/* main: the command line. */
#include <lauxlib.h>
#include <luajit.h>
#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bell.h"
#include "log.h"
#include "server.h"
#include "timer.h"
#include "tls.h"
#include "version.h"
#include "vm.h"

/* Closes what is left on a loop; handles already closing (Redis
 * connections closed with the Lua state) are left to their callbacks. */
static void close_unclosed(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static const char usage[] =
    "usage: wxd <command> [options]\n"
    "\n"
    "commands:\n"
    "  run [APPDIR] [--listen HOST:PORT] [--https-listen HOST:PORT] [--workers N]\n"
    "      [--pid FILE] [--admin HOST:PORT]\n"
    "                      serve the app in APPDIR (default: .); --pid writes a pid\n"
    "                      file (and FILE.status); --admin serves GET /status there;\n"
    "                      --https-listen needs https.cert and https.key in config.lua\n"
    "  dev [APPDIR] [options of run]\n"
    "                      like run, with one worker by default, reloading the app\n"
    "                      whenever a .lua file under APPDIR changes\n"
    "  reload [--pid FILE] [--timeout SECONDS]\n"
    "                      hot-reload a running server (default FILE: wxd.pid) and\n"
    "                      wait for the outcome: exit 0 when the new code serves,\n"
    "                      1 with the error when the reload was refused\n"
    "  restart [--pid FILE] [--timeout SECONDS]\n"
    "                      graceful restart in place (also SIGUSR2): a new process\n"
    "                      with the same command line takes the ports, the old one\n"
    "                      drains and exits; exit 0 once the new one serves\n"
    "  check [APPDIR]      load the app and its config once, report errors, exit\n"
    "  new DIR             create an app in DIR (app.lua, config.lua, handlers/,\n"
    "                      spec/ with a passing spec, .gitignore)\n"
    "  test [PATHS] [OPTS] run an app's busted specs (default: spec/) inside the\n"
    "                      runtime; wxd.testing loads the app and sends requests\n"
    "  script FILE [ARGS]  run a Lua file inside the runtime (event loop and\n"
    "                      native modules available; used to run the specs);\n"
    "                      a number returned by the file is the exit code\n"
    "  version             print the version (also --version, -v)\n"
    "  help                this text (also --help, -h); `wxd COMMAND --help`\n"
    "                      shows one command's\n"
    "\n"
    "environment:\n"
    "  WXD_LUA_DIR         where the wxd Lua library lives (default: next to the binary)\n"
    "  WXD_LOG_LEVEL       debug, info, warn or error (overrides config log.level)\n"
    "  WXD_ACCESS_LOG      off to disable the access log\n"
    "  WXD_LOG_FORMAT      json (default) or text (default of wxd dev)\n"
    "  WXD_WATCHDOG        off to stop watching for stuck workers (docs/runaway.md)\n"
    "\n"
    "signals: SIGTERM/SIGINT stop gracefully, SIGHUP reloads the app, SIGUSR2\n"
    "restarts in place\n";

/* `wxd COMMAND --help`: the command's own text. */
static const struct {
  const char *name, *text;
} command_help[] = {
    {"run",
     "usage: wxd run [APPDIR] [--listen HOST:PORT] [--https-listen HOST:PORT] [--workers N]\n"
     "               [--pid FILE] [--admin HOST:PORT]\n"
     "\n"
     "Serves the app in APPDIR (default: .): app.lua, config.lua, handlers/.\n"
     "  --listen, -l HOST:PORT   where to listen (default: config listen, 127.0.0.1:8080)\n"
     "  --https-listen HOST:PORT an HTTPS listener (needs https.cert and https.key in config.lua)\n"
     "  --workers, -w N          worker threads, 1..256 (default: config workers, or the CPUs)\n"
     "  --pid FILE               write a pid file (and FILE.status), for `wxd reload`\n"
     "  --admin HOST:PORT        serve GET /status there\n"
     "SIGTERM or SIGINT stop gracefully; SIGHUP reloads the app; SIGUSR2 restarts\n"
     "in place (a successor takes the ports; see wxd restart).\n"},
    {"dev",
     "usage: wxd dev [APPDIR] [options of wxd run]\n"
     "\n"
     "Like run, with one worker by default, reloading the app whenever a .lua\n"
     "file under APPDIR changes.\n"},
    {"check",
     "usage: wxd check [APPDIR]\n"
     "\n"
     "Loads the app in APPDIR (default: .) and its config once, reports errors\n"
     "and exits: 0 when it loads, 1 otherwise.\n"},
    {"reload",
     "usage: wxd reload [--pid FILE] [--timeout SECONDS]\n"
     "\n"
     "Hot-reloads a running server (its pid file, default wxd.pid) and waits for\n"
     "the outcome (at most SECONDS, default 60): exit 0 when the new code serves,\n"
     "1 with the error when the reload was refused (the old code keeps serving).\n"},
    {"restart",
     "usage: wxd restart [--pid FILE] [--timeout SECONDS]\n"
     "\n"
     "Restarts a running server in place (its pid file, default wxd.pid): a new\n"
     "process with the same command line binds the same ports, loads the app and\n"
     "takes new connections; the old one finishes its requests and exits. For a\n"
     "new binary or a change a reload cannot apply. Exit 0 once the new process\n"
     "serves (at most SECONDS, default 60), 1 when none took over (the old one\n"
     "keeps serving; its log says why).\n"},
    {"new",
     "usage: wxd new DIR\n"
     "\n"
     "Creates an app in DIR (made if missing; refused when it has an app.lua):\n"
     "app.lua, config.lua, handlers/hello.lua, spec/hello_spec.lua and a\n"
     ".gitignore for pid and status files. Then: cd DIR && wxd dev; wxd test.\n"},
    {"test",
     "usage: wxd test [PATHS] [busted options]\n"
     "\n"
     "Runs busted specs (default: spec/ in the current directory) inside the\n"
     "runtime, so that they can require wxd and its native modules and wait with\n"
     "wxd.sleep; wxd.testing.app(\".\") loads the app to send it requests.\n"
     "Exit 0 when every spec passed, 1 otherwise. Needs busted (lua-busted).\n"},
    {"script",
     "usage: wxd script FILE [ARGS]\n"
     "\n"
     "Runs a Lua file inside the runtime: the event loop and the native modules\n"
     "are there (wxd.sleep, wxd.http, ...). ARGS are `...` and arg[1..]; a number\n"
     "the file returns is the exit code. Options after FILE belong to it.\n"},
};

/* 1 when argv asks for the command's help: any --help/-h among the
 * options (for script, only before FILE). */
static int wants_help(const char *cmd, int argc, char **argv) {
  for (int i = 0; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return 1;
    if (strcmp(cmd, "script") == 0) return 0;
  }
  return 0;
}

static int print_command_help(const char *cmd) {
  for (size_t i = 0; i < sizeof command_help / sizeof command_help[0]; i++) {
    if (strcmp(command_help[i].name, cmd) == 0) {
      fputs(command_help[i].text, stdout);
      return 0;
    }
  }
  return 2;
}

static int file_exists(const char *p) {
  struct stat st;
  return stat(p, &st) == 0;
}

/* The Lua library: $WXD_LUA_DIR, else ../lua next to the binary (a build
 * tree), else ../share/lua/5.1 next to it (where `luarocks make` installs
 * the library of a binary in a rock tree's bin/: the system tree, --local
 * or --tree), else nothing and package.path finds an installed copy. */
static void find_lua_dir(char *out, size_t cap) {
  out[0] = 0;
  const char *env = getenv("WXD_LUA_DIR");
  if (env && *env) {
    snprintf(out, cap, "%s", env);
    return;
  }
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return;
  exe[n] = 0;
  char *slash = strrchr(exe, '/');
  if (!slash) return;
  *slash = 0;
  /* build/wxd and build/asan/wxd both find the source tree's lua/; an
   * installed binary finds its rock tree's share/lua/5.1 (LuaRocks puts
   * the module "wxd" there as wxd.lua, the others under wxd/). */
  static const char *const dirs[] = {"../lua", "../../lua", "../share/lua/5.1"};
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
    char cand[PATH_MAX + 40];
    snprintf(cand, sizeof cand, "%s/%s/wxd/server.lua", exe, dirs[i]);
    if (!file_exists(cand)) continue;
    snprintf(cand, sizeof cand, "%s/%s", exe, dirs[i]);
    if (!realpath(cand, out)) out[0] = 0;
    return;
  }
}

static int prepare_app(wxd_config_t *cfg, const char *appdir) {
  if (!realpath(appdir, cfg->app_dir)) {
    fprintf(stderr, "wxd: app directory %s: not found\n", appdir);
    return -1;
  }
  char app_lua[PATH_MAX + 16];
  snprintf(app_lua, sizeof app_lua, "%s/app.lua", cfg->app_dir);
  if (!file_exists(app_lua)) {
    fprintf(stderr, "wxd: %s has no app.lua: not an app directory\n", cfg->app_dir);
    return -1;
  }
  find_lua_dir(cfg->lua_dir, sizeof cfg->lua_dir);
  char err[2048];
  if (wxd_config_load(cfg, err, sizeof err) != 0) {
    fprintf(stderr, "wxd: %s\n", err);
    return -1;
  }
  return 0;
}

enum { MODE_RUN, MODE_CHECK, MODE_DEV };

/* A fingerprint of the Lua files under dir (their names' lengths, sizes
 * and modification times), to notice a change without a running server. */
static unsigned long long lua_files_fingerprint(const char *dir, int depth) {
  unsigned long long h = 1469598103934665603ULL;
  DIR *d = depth <= 6 ? opendir(dir) : NULL;
  if (!d) return h;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    /* As the dev watcher: hidden folders, dependencies and build output are not app code. */
    if (de->d_name[0] == '.' || strcmp(de->d_name, "node_modules") == 0 || strcmp(de->d_name, "build") == 0)
      continue;
    char sub[PATH_MAX];
    if (snprintf(sub, sizeof sub, "%s/%s", dir, de->d_name) >= (int)sizeof sub) continue;
    struct stat st;
    if (lstat(sub, &st) != 0) continue;
    size_t n = strlen(de->d_name);
    if (S_ISDIR(st.st_mode)) {
      h = (h ^ lua_files_fingerprint(sub, depth + 1)) * 1099511628211ULL;
    } else if (n > 4 && strcmp(de->d_name + n - 4, ".lua") == 0) {
      unsigned long long v[4] = {(unsigned long long)n, (unsigned long long)st.st_size,
                                 (unsigned long long)st.st_mtim.tv_sec, (unsigned long long)st.st_mtim.tv_nsec};
      for (int i = 0; i < 4; i++) h = (h ^ v[i]) * 1099511628211ULL;
    }
  }
  closedir(d);
  return h;
}

/* `wxd dev` after a start-up that failed (config or app): waits until a
 * Lua file under appdir changes, so that fixing the code starts the server.
 * Returns 0 when appdir cannot be read (nothing to wait for). */
static int dev_wait_for_change(const char *appdir) {
  char dir[PATH_MAX];
  if (!realpath(appdir, dir)) return 0;
  wxd_logf(WXD_LOG_WARN, -1, "dev: not serving; fix the error above, wxd starts again when a .lua file under %s "
           "changes", dir);
  /* No server, no loop: SIGTERM and SIGINT end the process as usual,
   * whatever handlers the server that failed had set. */
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);
  unsigned long long before = lua_files_fingerprint(dir, 0);
  for (;;) {
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    if (lua_files_fingerprint(dir, 0) != before) break;
  }
  /* An editor may write a file in steps: let it finish. */
  struct timespec settle = {0, 150000000};
  nanosleep(&settle, NULL);
  wxd_log(WXD_LOG_INFO, -1, "dev: a file changed, starting again", NULL);
  return 1;
}

/* Matches argv[*i] against "--name VALUE", "--name=VALUE" or "-s VALUE".
 * Returns 1 with *value set (and *i past a separate value), 0 when it is
 * another argument, -1 when the value is missing. */
static int option(int argc, char **argv, int *i, const char *name, const char *shortname, const char **value) {
  const char *a = argv[*i];
  size_t n = strlen(name);
  if (strncmp(a, name, n) == 0 && a[n] == '=') {
    *value = a + n + 1;
    return 1;
  }
  if (strcmp(a, name) != 0 && !(shortname && strcmp(a, shortname) == 0)) return 0;
  if (++*i >= argc) return -1;
  *value = argv[*i];
  return 1;
}

/* WXD_LOG_FORMAT: text or json; unset or empty gives dflt_text. -1 when
 * it names neither (said on stderr). */
static int log_format_from_env(int dflt_text) {
  const char *f = getenv("WXD_LOG_FORMAT");
  if (!f || !*f) return dflt_text;
  if (strcmp(f, "text") == 0) return 1;
  if (strcmp(f, "json") == 0) return 0;
  fprintf(stderr, "wxd: WXD_LOG_FORMAT: expected text or json, got \"%s\"\n", f);
  return -1;
}

static int cmd_run(int argc, char **argv, int mode, char **full_argv) {
  static wxd_config_t cfg; /* large (paths); lives as long as the server */
  const char *appdir = ".";
  const char *listen = NULL;
  const char *https_listen = NULL;
  const char *admin = NULL;
  const char *pid_file = NULL;
  int workers = -1;
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    const char *v;
    int m;
    if ((m = option(argc, argv, &i, "--listen", "-l", &v)) != 0) {
      if (m < 0) goto missing;
      listen = v;
    } else if ((m = option(argc, argv, &i, "--https-listen", NULL, &v)) != 0) {
      if (m < 0) goto missing;
      https_listen = v;
    } else if ((m = option(argc, argv, &i, "--admin", NULL, &v)) != 0) {
      if (m < 0) goto missing;
      admin = v;
    } else if ((m = option(argc, argv, &i, "--pid", NULL, &v)) != 0) {
      if (m < 0) goto missing;
      pid_file = v;
    } else if ((m = option(argc, argv, &i, "--workers", "-w", &v)) != 0) {
      if (m < 0) goto missing;
      char *end;
      long n = strtol(v, &end, 10);
      if (*end || n < 1 || n > 256) {
        fprintf(stderr, "wxd: --workers: expected 1..256, got \"%s\"\n", v);
        return 2;
      }
      workers = (int)n;
    } else if (a[0] == '-') {
      fprintf(stderr, "wxd: unknown option %s (see wxd --help)\n", a);
      return 2;
    } else {
      appdir = a;
    }
    continue;
  missing:
    fprintf(stderr, "wxd: %s needs a value\n", a);
    return 2;
  }
again:
  memset(&cfg, 0, sizeof cfg);
  wxd_config_defaults(&cfg);
  if (prepare_app(&cfg, appdir) != 0) {
    if (mode == MODE_DEV && dev_wait_for_change(appdir)) goto again;
    return 1;
  }
  char err[512];
  if (listen && wxd_config_set_listen(&cfg, listen, err, sizeof err) != 0) {
    fprintf(stderr, "wxd: %s\n", err);
    return 2;
  }
  if (https_listen) {
    if (!cfg.https.enabled) {
      fprintf(stderr, "wxd: --https-listen needs an https section with cert and key in config.lua\n");
      return 2;
    }
    char e[400];
    if (wxd_parse_listen(https_listen, cfg.https.host, sizeof cfg.https.host, &cfg.https.port, e, sizeof e) != 0) {
      fprintf(stderr, "wxd: --https-listen: %s\n", e);
      return 2;
    }
  }
  if (admin) {
    char e[400];
    if (wxd_parse_listen(admin, cfg.admin_host, sizeof cfg.admin_host, &cfg.admin_port, e, sizeof e) != 0) {
      fprintf(stderr, "wxd: --admin: %s\n", e);
      return 2;
    }
  }
  if (pid_file) {
    /* Absolute, so that `wxd reload --pid` from elsewhere finds the same file. */
    if (pid_file[0] == '/') snprintf(cfg.pid_file, sizeof cfg.pid_file, "%s", pid_file);
    else {
      char cwd[PATH_MAX];
      if (!getcwd(cwd, sizeof cwd)) cwd[0] = 0;
      if (snprintf(cfg.pid_file, sizeof cfg.pid_file, "%s/%s", cwd, pid_file) >= (int)sizeof cfg.pid_file) {
        fprintf(stderr, "wxd: --pid: path too long\n");
        return 2;
      }
    }
  }
  if (workers > 0) cfg.workers = workers;
  else if (mode == MODE_DEV) cfg.workers = 1;
  cfg.dev = mode == MODE_DEV;
  wxd_config_apply_env(&cfg);
  wxd_log_set_level(cfg.log_level);
  /* Text for people in dev, JSON lines for machines otherwise. */
  int text = log_format_from_env(mode == MODE_DEV);
  if (text < 0) return 2;
  wxd_log_set_text_format(text);
  if (mode == MODE_CHECK && cfg.https.enabled) {
    char terr[1024];
    SSL_CTX *ctx = wxd_https_ctx(&cfg.https, terr, sizeof terr);
    if (!ctx) {
      fprintf(stderr, "wxd: %s\n", terr);
      return 1;
    }
    SSL_CTX_free(ctx);
  }
  if (mode == MODE_CHECK) {
    /* One worker's worth of loading, without listening. */
    uv_loop_t loop;
    uv_loop_init(&loop);
    wxd_vm_options_t opts = {cfg.lua_dir[0] ? cfg.lua_dir : NULL, cfg.app_dir, 0, 0};
    wxd_vm_t *vm = wxd_vm_new(&loop, &opts);
    int rc = 1;
    if (vm) {
      lua_State *L = vm->L;
      lua_getglobal(L, "require");
      lua_pushliteral(L, "wxd.server");
      if (lua_pcall(L, 1, 1, 0) == 0) {
        lua_getfield(L, -1, "load_app");
        lua_pushstring(L, cfg.app_dir);
        lua_pushinteger(L, 0);
        lua_pushinteger(L, 1);
        if (lua_pcall(L, 3, 2, 0) == 0 && !lua_isnil(L, -2)) rc = 0;
      }
      if (rc != 0) fprintf(stderr, "wxd: %s\n", lua_tostring(L, -1));
      else printf("ok: %s\n", cfg.app_dir);
    }
    wxd_vm_free(vm);
    uv_walk(&loop, close_unclosed, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return rc;
  }
  int rc = wxd_server_run(&cfg, full_argv);
  if (rc == WXD_SERVER_APP_FAILED) {
    if (mode == MODE_DEV && dev_wait_for_change(appdir)) goto again;
    rc = 1;
  }
  return rc;
}

typedef struct script_state {
  int exit_code;
} script_state_t;

static void on_script_done(wxd_co_t *co, int status) {
  script_state_t *s = co->data;
  if (status != 0) {
    const char *msg = lua_tostring(co->T, -1);
    wxd_co_traceback(co, msg ? msg : "(error object is not a string)");
    fprintf(stderr, "wxd: %s\n", lua_tostring(co->vm->L, -1));
    lua_pop(co->vm->L, 1);
    s->exit_code = 1;
    /* A failed script ends now, whatever timers or waits it left. */
    wxd_timers_close(co->vm);
    wxd_vm_cancel_waits(co->vm);
  } else if (lua_gettop(co->T) >= 1 && lua_type(co->T, 1) == LUA_TNUMBER) {
    /* A main chunk may return its exit code: unlike os.exit, this closes
     * the Lua state and the loop properly. */
    s->exit_code = (int)lua_tointeger(co->T, 1);
  } else {
    s->exit_code = 0;
  }
}

/* Runs a chunk in a script coroutine on a fresh loop until both are done.
 * The chunk is at the top of the VM's stack; args are pushed as strings. */
static int run_chunk(wxd_vm_t *vm, uv_loop_t *loop, int argc, char **argv) {
  script_state_t st = {1};
  wxd_timers_activate(vm);
  wxd_co_t *co = wxd_co_new(vm, WXD_CO_SCRIPT, on_script_done, &st);
  if (!co) return 1;
  lua_xmove(vm->L, co->T, 1);
  for (int i = 0; i < argc; i++) lua_pushstring(co->T, argv[i]);
  wxd_co_resume(co, argc);
  uv_run(loop, UV_RUN_DEFAULT);
  return st.exit_code;
}

/* Frees a script's VM (its waits cancelled), then its bell and loop. */
static void free_script_vm(wxd_vm_t *vm, uv_loop_t *loop) {
  wxd_bell_t *bell = vm->bell;
  wxd_vm_free(vm);
  if (bell) wxd_bell_close(bell);
  uv_walk(loop, close_unclosed, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  if (bell) wxd_bell_destroy(bell);
}

/* Commands written in Lua (lua/wxd/cli.lua): reload, restart, new, test. */
static int cmd_lua_cli(const char *name, int argc, char **argv) {
  char lua_dir[PATH_MAX];
  find_lua_dir(lua_dir, sizeof lua_dir);
  uv_loop_t loop;
  uv_loop_init(&loop);
  wxd_vm_options_t opts = {lua_dir[0] ? lua_dir : NULL, NULL, -1, 0};
  wxd_vm_t *vm = wxd_vm_new(&loop, &opts);
  if (!vm) return 1;
  wxd_bell_t bell;
  vm->bell = wxd_bell_open(&bell, &loop) == 0 ? &bell : NULL;
  lua_State *L = vm->L;
  char code[128];
  snprintf(code, sizeof code, "return require('wxd.cli').%s(...)", name);
  int rc = 1;
  if (luaL_loadstring(L, code) != 0) fprintf(stderr, "wxd: %s\n", lua_tostring(L, -1));
  else rc = run_chunk(vm, &loop, argc, argv);
  free_script_vm(vm, &loop);
  return rc;
}

static int cmd_script(int argc, char **argv) {
  if (argc < 1) {
    fprintf(stderr, "wxd: script needs a FILE (see wxd --help)\n");
    return 2;
  }
  char lua_dir[PATH_MAX];
  find_lua_dir(lua_dir, sizeof lua_dir);
  const char *lv = getenv("WXD_LOG_LEVEL");
  if (lv && wxd_log_parse_level(lv) >= 0) wxd_log_set_level(wxd_log_parse_level(lv));
  int text = log_format_from_env(0);
  if (text < 0) return 2;
  wxd_log_set_text_format(text);
  uv_loop_t loop;
  uv_loop_init(&loop);
  wxd_vm_options_t opts = {lua_dir[0] ? lua_dir : NULL, NULL, -1, 0};
  wxd_vm_t *vm = wxd_vm_new(&loop, &opts);
  if (!vm) return 1;
  wxd_bell_t bell;
  vm->bell = wxd_bell_open(&bell, &loop) == 0 ? &bell : NULL;
  lua_State *L = vm->L;
  /* arg, as the lua interpreter sets it: arg[0] is the script. */
  lua_createtable(L, argc, 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");
  int rc = 1;
  if (luaL_loadfile(L, argv[0]) != 0) fprintf(stderr, "wxd: %s\n", lua_tostring(L, -1));
  else rc = run_chunk(vm, &loop, argc - 1, argv + 1);
  free_script_vm(vm, &loop);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
      strcmp(argv[1], "help") == 0) {
    fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-v") == 0 ||
      strcmp(argv[1], "version") == 0) {
    printf("wxd %s (%s, libuv %s)\n", WXD_VERSION, LUAJIT_VERSION, uv_version_string());
    return 0;
  }
  if (wants_help(argv[1], argc - 2, argv + 2) && print_command_help(argv[1]) == 0) return 0;
  if (strcmp(argv[1], "run") == 0) return cmd_run(argc - 2, argv + 2, MODE_RUN, argv);
  if (strcmp(argv[1], "dev") == 0) return cmd_run(argc - 2, argv + 2, MODE_DEV, argv);
  if (strcmp(argv[1], "check") == 0) return cmd_run(argc - 2, argv + 2, MODE_CHECK, argv);
  if (strcmp(argv[1], "reload") == 0) return cmd_lua_cli("reload", argc - 2, argv + 2);
  if (strcmp(argv[1], "restart") == 0) return cmd_lua_cli("restart", argc - 2, argv + 2);
  if (strcmp(argv[1], "new") == 0) return cmd_lua_cli("new", argc - 2, argv + 2);
  if (strcmp(argv[1], "test") == 0) return cmd_lua_cli("test", argc - 2, argv + 2);
  if (strcmp(argv[1], "script") == 0) return cmd_script(argc - 2, argv + 2);
  fprintf(stderr, "wxd: unknown command \"%s\" (see wxd --help)\n", argv[1]);
  return 2;
}
