-- Spec helpers: start real wxd processes on free ports, talk to them over
-- raw sockets (luasocket, blocking with timeouts), parse what comes back.
local socket = require "socket"
local wxd = require "wxd"

local H = {}

H.WXD = os.getenv("WXD") or "build/wxd"
H.ROOT = os.getenv("PWD") or "."

--- Runs a shell command; returns its output (stdout and stderr) and exit code.
local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("__rc=(%d+)%s*$"))
  return (out:gsub("__rc=%d+%s*$", "")), code
end
H.sh = sh

function H.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- A wxd journal's records (core/journal.c) without the zero-filled space it
-- keeps after them (each record: u32 length, u32 CRC, payload; a zero
-- length ends them).
function H.journal_records(data)
  local off = 1
  while off + 8 <= #data do
    local a, b, c, d = data:byte(off, off + 3)
    local plen = a + b * 256 + c * 65536 + d * 16777216
    if plen == 0 then break end
    off = off + 8 + plen
  end
  return data:sub(1, off - 1)
end

function H.write_file(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

function H.tmpdir()
  local out = sh("mktemp -d /tmp/wxd-spec.XXXXXX")
  return (out:gsub("%s+$", ""))
end

--- A TCP port nobody listens on right now, and not one this process handed
-- out before: the kernel may give a port just closed again, and a spec
-- that asks for two (a server's listen and admin ports) must get two.
local handed_out = {}
function H.free_port()
  for _ = 1, 100 do
    local s = assert(socket.bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    s:close()
    port = tonumber(port)
    if not handed_out[port] then
      handed_out[port] = true
      return port
    end
  end
  error("H.free_port: no port this process has not used already")
end

--- Polls fn every 20 ms until it returns a truthy value or `timeout` s pass.
function H.wait_until(fn, timeout, what)
  local deadline = socket.gettime() + (timeout or 5)
  while true do
    local v = fn()
    if v then return v end
    if socket.gettime() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    wxd.sleep(20)
  end
end

local Server = {}
Server.__index = Server

--- Starts `wxd run APPDIR` on a free port and waits until it accepts.
-- opts: workers (default 1), env (string of VAR=value pairs), args, mode
-- ("run" or "dev"), pid (write DIR/wxd.pid, for `wxd reload`), steering
-- (WXD_STEERING; default "hash").
function H.start(appdir, opts)
  opts = opts or {}
  local dir = H.tmpdir()
  local port = opts.port or H.free_port()
  local self = setmetatable({ port = port, dir = dir, log = dir .. "/wxd.log",
                              pidfile = dir .. "/pid", rcfile = dir .. "/rc" }, Server)
  if opts.pid then
    opts.args = (opts.args or "") .. " --pid " .. dir .. "/wxd.pid"
  end
  -- Specs about several workers need connections spread over them: by
  -- default they get hash steering (the steering spec sets opts.steering).
  -- spec/run.sh checks after the suite that every server it records here
  -- ended, and none by a crash.
  local record = os.getenv("WXD_SPEC_SERVERS")
  local started, ended = "", ""
  if record then
    started = string.format("; echo \"start $p\" >>%s", record)
    ended = string.format("; echo \"exit $p $rc\" >>%s", record)
  end
  local cmd = string.format(
    "(WXD_STEERING=%s %s %s %s %s --listen 127.0.0.1:%d --workers %d %s >%s 2>&1 & p=$!%s; echo $p >%s.tmp; mv %s.tmp %s; "
      .. "wait $p; rc=$?%s; echo $rc >%s.tmp; mv %s.tmp %s) >/dev/null 2>&1 &",
    opts.steering or "hash", opts.env or "", H.WXD, opts.mode or "run", appdir, port, opts.workers or 1, opts.args or "",
    self.log,
    started, self.pidfile, self.pidfile, self.pidfile, ended, self.rcfile, self.rcfile, self.rcfile)
  os.execute(cmd)
  -- The files are written whole and renamed: a reader never sees them empty.
  H.wait_until(function() return H.read_file(self.pidfile) end, 10, "pid file")
  self.pid = assert(tonumber(H.read_file(self.pidfile):match("%d+")), "no pid in " .. self.pidfile)
  if opts.expect_failure then return self end
  local ok = pcall(H.wait_until, function()
    if H.read_file(self.rcfile) then error("wxd exited:\n" .. (H.read_file(self.log) or "")) end
    local c = socket.connect("127.0.0.1", port)
    if c then c:close() return true end
  end, 10, "wxd to listen")
  if not ok then
    local log = H.read_file(self.log) or ""
    self:kill()
    error("wxd did not start:\n" .. log, 2)
  end
  return self
end

--- Exit code once the process ended (nil while it runs).
function Server:exit_code()
  local rc = H.read_file(self.rcfile)
  return rc and tonumber(rc:match("%d+"))
end

function Server:signal(sig)
  if not self.pid then error("Server:signal(" .. tostring(sig) .. "): the server has no pid (it did not start)", 2) end
  if sig == "TERM" or sig == "INT" then self.stopping = true end
  os.execute(string.format("kill -%s %d 2>/dev/null", sig, self.pid))
end

--- Raises when the server's log holds a sanitizer report (make asan): a
-- memory error in a server process must fail the spec that caused it.
function Server:check_sanitizers()
  local log = self:log_text()
  local s = log:find("ERROR: AddressSanitizer", 1, true) or log:find("ERROR: LeakSanitizer", 1, true)
    or log:find("runtime error:", 1, true)
  if s then error("sanitizer report in the wxd log:\n" .. log:sub(s, s + 3000), 2) end
end

--- SIGTERM, then waits for the exit; returns the exit code.
function Server:stop(timeout)
  if not self:exit_code() and not self.stopping then self:signal("TERM") end
  local ok = pcall(H.wait_until, function() return self:exit_code() end, timeout or 15, "wxd to exit")
  if not ok then self:kill() end
  self:check_sanitizers()
  return self:exit_code()
end

function Server:kill()
  self:signal("KILL")
  pcall(H.wait_until, function() return self:exit_code() end, 5)
end

function Server:log_text() return H.read_file(self.log) or "" end

--- The lines of the server's log that contain `text` (a plain find).
function Server:log_lines(text)
  local out = {}
  for l in self:log_text():gmatch("[^\n]+") do
    if l:find(text, 1, true) then out[#out + 1] = l end
  end
  return out
end

function Server:cleanup()
  if not self:exit_code() then self:kill() end
  os.execute("rm -rf " .. self.dir)
end

--- Connects a client socket to the server.
function Server:connect(timeout)
  local c = assert(socket.tcp())
  c:settimeout(timeout or 5)
  assert(c:connect("127.0.0.1", self.port))
  c:setoption("tcp-nodelay", true)
  return c
end

--- Reads until the peer closes or `timeout` seconds of silence.
-- Returns the bytes and whether the peer closed.
function H.read_all(c, timeout)
  c:settimeout(timeout or 5)
  local parts = {}
  while true do
    local data, err, partial = c:receive(4096)
    if data then parts[#parts + 1] = data
    else
      if partial and #partial > 0 then parts[#parts + 1] = partial end
      return table.concat(parts), err == "closed"
    end
  end
end

--- Sends raw bytes (optionally one byte per write) and reads until close.
-- opts.split: one byte per send; opts.timeout: read timeout (s).
function Server:raw(bytes, opts)
  opts = opts or {}
  local c = self:connect()
  if opts.split then
    for i = 1, #bytes do
      local ok = c:send(bytes:sub(i, i))
      if not ok then break end -- the server may close early on a refused shape
      if opts.split_delay then socket.sleep(opts.split_delay) end
    end
  else
    c:send(bytes)
  end
  local out, closed = H.read_all(c, opts.timeout or 5)
  c:close()
  return out, closed
end

--- Parses a byte string into a list of HTTP responses.
-- Each: { status, reason, headers (lower-case names), raw_headers, body, version }.
function H.parse_responses(s, head_request)
  local out = {}
  local pos = 1
  while pos <= #s do
    local hend = s:find("\r\n\r\n", pos, true)
    if not hend then error("incomplete response head: " .. s:sub(pos, pos + 200)) end
    local head = s:sub(pos, hend - 1)
    pos = hend + 4
    local version, status, reason = head:match("^HTTP/(%d%.%d) (%d%d%d) ?([^\r\n]*)")
    assert(version, "bad status line: " .. head:sub(1, 100))
    local r = { version = version, status = tonumber(status), reason = reason, headers = {},
                raw_headers = head, body = "" }
    for name, value in head:gmatch("\r\n([^:\r\n]+): ?([^\r\n]*)") do
      local k = name:lower()
      r.headers[k] = r.headers[k] and (r.headers[k] .. ", " .. value) or value
    end
    local no_body = head_request or r.status < 200 or r.status == 204 or r.status == 304
    if no_body then -- luacheck: ignore 542 (nothing to read)
    elseif (r.headers["transfer-encoding"] or ""):lower() == "chunked" then
      local parts = {}
      while true do
        local line_end = assert(s:find("\r\n", pos, true), "incomplete chunk size")
        local size = tonumber(s:sub(pos, line_end - 1):match("^%x+"), 16)
        pos = line_end + 2
        if size == 0 then
          local tend = assert(s:find("\r\n", pos, true), "incomplete trailer")
          pos = tend + 2
          break
        end
        parts[#parts + 1] = s:sub(pos, pos + size - 1)
        pos = pos + size + 2
      end
      r.body = table.concat(parts)
    elseif r.headers["content-length"] then
      local n = tonumber(r.headers["content-length"])
      r.body = s:sub(pos, pos + n - 1)
      assert(#r.body == n, "truncated body")
      pos = pos + n
    else
      r.body = s:sub(pos)
      pos = #s + 1
    end
    out[#out + 1] = r
    -- 1xx responses precede the final one
  end
  return out
end

--- One request on a fresh connection; returns the parsed response.
function Server:request(method, path, headers, body)
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: localhost", "Connection: close" }
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  if body then lines[#lines + 1] = "Content-Length: " .. #body end
  local raw = table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
  local out = self:raw(raw)
  local rs = H.parse_responses(out, method == "HEAD")
  return rs[#rs], out
end

function Server:get(path, headers) return self:request("GET", path, headers) end

--- GETs path and decodes its JSON body, asserting a 200.
function Server:get_json(path)
  local r = self:get(path)
  assert(r.status == 200, "GET " .. path .. ": " .. r.status .. " " .. r.body)
  return require("cjson").decode(r.body)
end

--- A raw POST request (no Connection header: H.pipelined adds it).
function H.post_raw(path, body)
  body = body or ""
  return "POST " .. path .. " HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
end

--- Opens one connection per batch, sends every batch (all connections in
-- flight at once), then reads each connection to its close. Each batch is
-- a list of raw requests; the last one of each gets Connection: close.
-- Returns a list of response lists, one per batch.
function H.pipelined(srv, batches)
  local conns = {}
  for i = 1, #batches do conns[i] = srv:connect(20) end
  for i, reqs in ipairs(batches) do
    local copy = { unpack(reqs) }
    copy[#copy] = copy[#copy]:gsub("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)
    assert(conns[i]:send(table.concat(copy)))
  end
  local out = {}
  for i, c in ipairs(conns) do
    local raw = H.read_all(c, 30)
    c:close()
    local ok, resps = pcall(H.parse_responses, raw)
    if not ok then error(resps .. "\nraw: " .. raw:sub(1, 800), 2) end
    out[i] = resps
  end
  return out
end

--- Path of a spec fixture app.
--- The admin /status of a server (`--admin 127.0.0.1:PORT`), decoded.
function H.status(port)
  local c = assert(socket.connect("127.0.0.1", port))
  c:send("GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
  local out = H.read_all(c, 5)
  c:close()
  return require("cjson").decode(H.parse_responses(out)[1].body)
end

--- Starts spec/fixtures/apps/upstream/raw_peer.lua (canned bad responses)
-- in MODE ("canned", "drop", "stall", "silent") on a free port and waits
-- until it listens. Returns { port, base = "http://127.0.0.1:PORT",
-- stop = function }. WXD may be a relative or an absolute path.
function H.raw_peer(mode)
  local dir = H.tmpdir()
  local port = H.free_port()
  local log = dir .. "/peer.log"
  local bin = H.WXD:sub(1, 1) == "/" and H.WXD or H.ROOT .. "/" .. H.WXD
  os.execute(string.format(
    "(%s script %s/spec/fixtures/apps/upstream/raw_peer.lua %d %s >%s 2>&1 </dev/null & echo $! >%s.tmp; mv %s.tmp %s.pid)",
    bin, H.ROOT, port, mode, log, log, log, log))
  local ok = pcall(H.wait_until, function() return (H.read_file(log) or ""):find("listening", 1, true) end, 10)
  local pid = tonumber((H.read_file(log .. ".pid") or ""):match("%d+"))
  local peer = { port = port, base = "http://127.0.0.1:" .. port }
  function peer.stop()
    if pid then os.execute("kill " .. pid .. " 2>/dev/null") end
    os.execute("rm -rf " .. dir)
  end
  if not ok then
    local out = H.read_file(log) or ""
    peer.stop()
    error("raw peer (" .. mode .. ") did not start:\n" .. out, 2)
  end
  return peer
end

function H.app(name) return H.ROOT .. "/spec/fixtures/apps/" .. name end

--- The URL of the redis-server spec/run.sh started (raises without one).
function H.redis_url()
  local url = os.getenv("WXD_TEST_REDIS_URL")
  if not url or url == "" then error("WXD_TEST_REDIS_URL is not set: run the specs with spec/run.sh", 2) end
  return url
end

local RedisServer = {}
RedisServer.__index = RedisServer

--- Starts an extra redis-server of its own (a free port, a temp dir), for
-- specs that stop and restart Redis or need other settings.
-- opts: args (more redis-server arguments, e.g. "--requirepass s3cret").
-- Returns an object with url, port, dir, start(), stop(), cleanup().
function H.redis_server(opts)
  opts = opts or {}
  local self = setmetatable({ dir = H.tmpdir(), port = opts.port or H.free_port(), args = opts.args or "" }, RedisServer)
  self.url = "redis://127.0.0.1:" .. self.port .. "/0"
  self:start()
  return self
end

function RedisServer:ping()
  local out = sh("redis-cli -p " .. self.port .. " " .. (self.cli_auth or "") .. " ping 2>/dev/null")
  return out:find("PONG", 1, true) ~= nil or out:find("NOAUTH", 1, true) ~= nil
end

--- Starts (again, on the same port) and waits until it answers.
function RedisServer:start()
  os.execute(string.format(
    "(redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s --daemonize no --logfile %s/redis.log %s"
      .. " & echo $! >%s/pid) >/dev/null 2>&1", self.port, self.dir, self.dir, self.args, self.dir))
  H.wait_until(function() return self:ping() end, 5, "redis-server on port " .. self.port)
  self.pid = tonumber((H.read_file(self.dir .. "/pid") or ""):match("%d+"))
end

--- Stops it (SIGKILL: like a crash) and waits until the port is closed.
function RedisServer:stop()
  if not self.pid then return end
  os.execute("kill -9 " .. self.pid .. " 2>/dev/null")
  self.pid = nil
  H.wait_until(function()
    local c = socket.connect("127.0.0.1", self.port)
    if c then c:close() return false end
    return true
  end, 5, "redis-server to stop")
end

function RedisServer:cleanup()
  self:stop()
  os.execute("rm -rf " .. self.dir)
end

return H
