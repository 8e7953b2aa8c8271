-- luacheck settings for `make lint`: luacheck over lua/, handlers/,
-- examples/, spec/ and the top-level app.lua and config.lua. Any warning
-- fails the target.
std = "luajit" -- LuaJIT 2.1 (OpenResty branch), what wxd embeds
max_line_length = 130

-- Specs run under busted, which provides these globals.
files["spec"] = {
  read_globals = {
    "describe", "it", "pending", "setup", "teardown", "before_each", "after_each",
    "assert", "spy", "stub", "mock", "finally", "insulate", "expose",
  },
}

-- wrk scripts: wrk provides `wrk` and calls the global callbacks the script
-- defines; a script's own globals are per-thread state (thread:set/get).
files["spec/bench/*wrk*.lua"] = {
  read_globals = { "wrk", "tid" },
  globals = { "setup", "init", "delay", "request", "response", "done", "wrapped", "bad" },
}

-- A config.lua runs in lua/wxd/config.lua's sandbox: only these names.
stds.wxd_config = {
  read_globals = {
    "string", "table", "math", os = { fields = { "getenv" } },
    "tonumber", "tostring", "pairs", "ipairs", "next", "type", "error", "assert",
    "select", "unpack", "env",
  },
}
files["**/config.lua"] = { std = "wxd_config" }
-- The loader itself is a module like the others.
files["lua/wxd/config.lua"] = { std = "luajit" }
