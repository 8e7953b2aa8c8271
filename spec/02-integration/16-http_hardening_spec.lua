-- HTTP hardening: which requests keep a connection alive, memory under
-- pipelining, and the shapes nginx refuses that reached apps (Host,
-- absolute-form targets, control bytes in the target, huge chunk sizes,
-- TRACE). Raw sockets throughout; the app is spec/fixtures/apps/hardening.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"
local wxd = require "wxd"

local function calls(srv) return tonumber(srv:get("/calls").body) end

local SMUGGLED = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
-- A second request that ends the connection, so a kept-alive one closes.
local SECOND = "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

describe("keep-alive decisions", function()
  local srv
  setup(function() srv = H.start(H.app("hardening")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  -- Heads of a first request that must end the connection: whatever
  -- follows is discarded unparsed.
  local CLOSE = {
    ["HTTP/1.0, Connection: close and Proxy-Connection: keep-alive (nginx's proxy_http_version 1.0)"] =
      "GET /hello HTTP/1.0\r\nConnection: close\r\nProxy-Connection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Proxy-Connection: keep-alive alone"] =
      "GET /hello HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: close then Connection: keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: keep-alive then Connection: close"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    ["HTTP/1.0, Connection: close, keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: Keep-Alive ,CLOSE"] =
      "GET /hello HTTP/1.0\r\nConnection: Keep-Alive ,CLOSE\r\n\r\n",
    ["HTTP/1.1, Connection: keep-alive then Connection: close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    ["HTTP/1.1, Connection: keep-alive, close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
    ["HTTP/1.1, Connection: te,\tClose "] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: te,\tClose \r\n\r\n",
  }
  -- Heads of a first request that keeps the connection: the next request
  -- is answered too.
  local KEEP = {
    ["HTTP/1.0, Connection: keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: x-foo, KEEP-ALIVE"] =
      "GET /hello HTTP/1.0\r\nConnection: x-foo, KEEP-ALIVE\r\n\r\n",
    ["HTTP/1.0, Connection: keep-alive and Proxy-Connection: close"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\nProxy-Connection: close\r\n\r\n",
    ["HTTP/1.1 and Proxy-Connection: close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nProxy-Connection: close\r\n\r\n",
    ["HTTP/1.1, Connection: closed (not the token close)"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n",
  }

  local function sorted(t)
    local names = {}
    for name in pairs(t) do names[#names + 1] = name end
    table.sort(names)
    return names
  end

  for _, name in ipairs(sorted(CLOSE)) do
    for _, split in ipairs({ false, true }) do
      it("closes after " .. name .. (split and ", one byte per write" or ""), function()
        local before = calls(srv)
        local out, closed = srv:raw(CLOSE[name] .. SMUGGLED, { split = split })
        local rs = H.parse_responses(out)
        assert.equal(1, #rs, "one response: " .. out:sub(1, 300))
        assert.equal("hello\n", rs[1].body)
        assert.equal("close", rs[1].headers["connection"])
        assert.is_true(closed, "connection closed")
        assert.equal(before + 1, calls(srv), "the bytes after it reached no handler")
      end)
    end
  end

  for _, name in ipairs(sorted(KEEP)) do
    for _, split in ipairs({ false, true }) do
      it("keeps the connection after " .. name .. (split and ", one byte per write" or ""), function()
        local out, closed = srv:raw(KEEP[name] .. SECOND, { split = split })
        local rs = H.parse_responses(out)
        assert.equal(2, #rs, "two responses: " .. out:sub(1, 300))
        assert.equal("keep-alive", rs[1].headers["connection"])
        assert.equal(200, rs[2].status)
        assert.equal("close", rs[2].headers["connection"])
        assert.is_true(closed)
      end)
    end
  end
end)

-- Memory of the server process, in KiB, from /proc. A sanitizer build's
-- RSS is mostly its own quarantine and shadow memory: there the specs check
-- that connections are held, not how much memory that saves.
local MEASURE_RSS = os.getenv("WXD_SANITIZED") ~= "1"
local function proc_kb(pid, field)
  if not MEASURE_RSS then return 0 end
  local s = H.read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(s:match(field .. ":%s*(%d+)"))
end

local function admin_status(port)
  local c = assert(socket.connect("127.0.0.1", port))
  c:settimeout(5)
  c:send("GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
  local out = H.read_all(c, 5)
  c:close()
  return cjson.decode(H.parse_responses(out)[1].body)
end

-- Connections of all workers waiting for their output to drain.
local function paused(port)
  local n = 0
  for _, w in ipairs(admin_status(port).workers) do n = n + (w.paused_for_output or 0) end
  return n
end

--- Reads `count` responses to GET /big?n=1..count off c, one at a time
-- (never the whole stream in memory); fails on the first out of order.
-- pause_ms: sleep after each read of at most `step` bytes (a slow reader).
local function read_big_responses(c, count, step, pause_ms)
  c:settimeout(30)
  local buf = ""
  local function need(n)
    while #buf < n do
      local data, err, partial = c:receive(step or 65536)
      data = data or partial
      if data and #data > 0 then buf = buf .. data
      elseif err then error("connection " .. err .. " after " .. #buf .. " bytes of a response") end
      if pause_ms then wxd.sleep(pause_ms) end
    end
  end
  for i = 1, count do
    local hend
    while true do
      hend = buf:find("\r\n\r\n", 1, true)
      if hend then break end
      need(#buf + 1)
    end
    local head = buf:sub(1, hend - 1)
    assert.equal("200", head:match("^HTTP/1%.1 (%d+)"), head)
    assert.equal(tostring(i), head:match("\r\n[Xx]%-[Nn]: (%d+)"), "response " .. i .. " in order")
    local len = tonumber(head:match("\r\n[Cc]ontent%-[Ll]ength: (%d+)"))
    assert.equal(65536, len)
    need(hend + 4 + len - 1)
    assert.equal(string.rep("b", 64), buf:sub(hend + 4, hend + 4 + 63))
    buf = buf:sub(hend + 4 + len)
  end
  assert.equal("", buf, "nothing after the last response")
end

local function pipeline_big(c, count)
  local reqs = {}
  for i = 1, count do
    reqs[i] = "GET /big?n=" .. i .. " HTTP/1.1\r\nHost: x\r\n" .. (i == count and "Connection: close\r\n" or "") .. "\r\n"
  end
  assert(c:send(table.concat(reqs)))
end

describe("pipelining without reading", function()
  local srv, admin
  setup(function()
    admin = H.free_port()
    srv = H.start(H.app("hardening"), { args = "--admin 127.0.0.1:" .. admin })
    -- Warm up (the first /big allocates what every later one reuses).
    assert.equal(200, srv:get("/big?n=1").status)
  end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local MiB = 1024 -- in KiB, the unit of /proc

  -- Sockets a failed assertion leaves open would keep an unfixed server
  -- growing: close them however the spec ends.
  local function closing(conns)
    finally(function() for _, c in ipairs(conns) do c:close() end end)
    return conns
  end

  it("keeps memory bounded, answers every request in order, and gives the memory back", function()
    local base = proc_kb(srv.pid, "VmRSS")
    local bound = 40 * MiB -- the unfixed server grew by ~230 MiB
    local conns = closing({})
    for i = 1, 4 do conns[i] = srv:connect(30) end
    for i = 1, 4 do pipeline_big(conns[i], 1000) end
    -- Until the server holds back every connection, or memory runs away.
    H.wait_until(function()
      return paused(admin) == 4 or proc_kb(srv.pid, "VmRSS") - base > bound
    end, 60, "all four connections to wait for their output")
    local grown = proc_kb(srv.pid, "VmRSS") - base
    assert.is_true(grown < bound, "RSS grew by " .. grown .. " KiB while nobody read")
    for i = 1, 4 do
      read_big_responses(conns[i], 1000)
      local _, err = conns[i]:receive(1)
      assert.equal("closed", err)
    end
    local peak = proc_kb(srv.pid, "VmHWM") - base
    assert.is_true(peak < bound, "peak RSS " .. peak .. " KiB above the start")
    H.wait_until(function() return paused(admin) == 0 end, 10, "no connection to be held any more")
    H.wait_until(function() return proc_kb(srv.pid, "VmRSS") - base < 4 * MiB end, 10,
      "RSS back within 4 MiB of the start")
    assert.equal(200, srv:get("/hello").status)
  end)

  it("bounds each of many connections, and gives the memory back once they close", function()
    -- More than the kernel buffers of a connection take (the server's send
    -- buffer grows up to tcp_wmem's maximum; the client's is kept small),
    -- so that the rest queues in the server.
    local wmem_max = tonumber((H.read_file("/proc/sys/net/ipv4/tcp_wmem") or ""):match("(%d+)%s*$")) or 4194304
    local per_conn = math.ceil((wmem_max + 2 * 1024 * 1024) / 65536)
    local nconns = 32
    local base = proc_kb(srv.pid, "VmRSS")
    local bound = nconns * MiB -- unfixed: per_conn * 64 KiB each (over 5 MiB)
    local conns = closing({})
    for i = 1, nconns do
      local c = assert(socket.tcp4())
      c:settimeout(30)
      assert(c:setoption("recv-buffer-size", 4096))
      assert(c:connect("127.0.0.1", srv.port))
      conns[i] = c
    end
    for i = 1, nconns do pipeline_big(conns[i], per_conn) end
    H.wait_until(function()
      return paused(admin) == nconns or proc_kb(srv.pid, "VmRSS") - base > bound
    end, 60, "every connection to be held")
    local grown = proc_kb(srv.pid, "VmRSS") - base
    assert.is_true(grown < bound, "RSS grew by " .. grown .. " KiB for " .. nconns .. " connections")
    for _, c in ipairs(conns) do c:close() end
    H.wait_until(function() return paused(admin) == 0 end, 10, "the connections to close")
    H.wait_until(function() return proc_kb(srv.pid, "VmRSS") - base < 4 * MiB end, 10,
      "RSS back within 4 MiB of the start")
    assert.equal(200, srv:get("/hello").status)
  end)

  it("completes every response, in order, for a slow reader", function()
    local c = closing({ srv:connect(30) })[1]
    pipeline_big(c, 120)
    read_big_responses(c, 120, 8192, 1)
    local _, err = c:receive(1)
    assert.equal("closed", err)
  end)

  it("finishes the queued requests of a client that half-closed", function()
    local c = closing({ srv:connect(30) })[1]
    pipeline_big(c, 50)
    c:shutdown("send")
    read_big_responses(c, 50)
    local _, err = c:receive(1)
    assert.equal("closed", err)
  end)
end)

describe("pipelining over HTTPS without reading", function()
  local srv, admin, dir
  setup(function()
    dir = H.tmpdir()
    local out, code = H.sh(string.format("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
      .. " -nodes -keyout key.pem -out cert.pem -subj /CN=localhost -days 2", dir))
    assert(code == 0, out)
    admin = H.free_port()
    srv = H.start(H.app("hardening"), {
      env = "WXD_SPEC_TLS_CERT=" .. dir .. "/cert.pem WXD_SPEC_TLS_KEY=" .. dir .. "/key.pem",
      args = "--admin 127.0.0.1:" .. admin .. " --https-listen 127.0.0.1:" .. H.free_port() })
    srv.https_port = tonumber(srv:log_text():match('"https":"127%.0%.0%.1:(%d+)"'))
    assert.equal(200, srv:get("/big?n=1").status)
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    os.execute("rm -rf " .. dir)
  end)

  it("holds the connection as on plain HTTP, and answers every request in order", function()
    -- openssl s_client writes into a pipe nobody reads until `go` exists:
    -- it stops reading the socket, as a client that never reads does.
    local count = 300
    local reqs = {}
    for i = 1, count do
      reqs[i] = "GET /big?n=" .. i .. " HTTP/1.1\r\nHost: x\r\n" .. (i == count and "Connection: close\r\n" or "") .. "\r\n"
    end
    H.write_file(dir .. "/reqs", table.concat(reqs))
    local base = proc_kb(srv.pid, "VmRSS")
    local bound = 8 * 1024 -- KiB; unfixed: count * 64 KiB, about 19 MiB
    os.execute(string.format("((cat %s/reqs; sleep 60) | timeout 60 openssl s_client -quiet -connect 127.0.0.1:%d 2>/dev/null"
      .. " | (while [ ! -e %s/go ]; do sleep 0.05; done; cat > %s/out; touch %s/done)) >/dev/null 2>&1 &",
      dir, srv.https_port, dir, dir, dir))
    finally(function() H.write_file(dir .. "/go", "") end)
    H.wait_until(function()
      return paused(admin) == 1 or proc_kb(srv.pid, "VmRSS") - base > bound
    end, 60, "the connection to be held")
    local grown = proc_kb(srv.pid, "VmRSS") - base
    assert.is_true(grown < bound, "RSS grew by " .. grown .. " KiB while nobody read")
    H.write_file(dir .. "/go", "")
    H.wait_until(function() return H.read_file(dir .. "/done") end, 60, "s_client to finish")
    local out = H.read_file(dir .. "/out")
    local rs = H.parse_responses(out)
    assert.equal(count, #rs)
    for i, r in ipairs(rs) do
      assert.equal(200, r.status)
      assert.equal(tostring(i), r.headers["x-n"], "response " .. i .. " in order")
      assert.equal(65536, #r.body)
    end
    H.wait_until(function() return paused(admin) == 0 end, 10, "the connection to be released")
  end)
end)

describe("request shapes nginx refuses", function()
  local srv
  setup(function() srv = H.start(H.app("hardening")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local function expect_refused(raw, status, split)
    local before = calls(srv)
    local out, closed = srv:raw(raw, { split = split })
    local rs = H.parse_responses(out)
    assert.equal(1, #rs, "one response: " .. out:sub(1, 300))
    assert.equal(status, rs[1].status, rs[1].body)
    assert.equal("close", rs[1].headers["connection"])
    assert.is_true(closed, "connection closed")
    assert.equal(before, calls(srv), "no handler ran")
  end

  local BAD_HOSTS = {
    ["empty"] = "", ["only spaces"] = "   ", ["a slash"] = "a/b", ["a backslash"] = "a\\b",
    ["a space"] = "a b", ["a tab"] = "a\tb", ["two dots"] = "a..b", ["only dots"] = "..",
    ["a port without a host"] = ":8080", ["a control byte"] = "a\1b", ["DEL"] = "a\127b",
  }
  local names = {}
  for name in pairs(BAD_HOSTS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, version in ipairs({ "1.1", "1.0" }) do
      it("400 for a Host with " .. name .. " (HTTP/" .. version .. ")", function()
        expect_refused("GET /hello HTTP/" .. version .. "\r\nHost: " .. BAD_HOSTS[name] .. "\r\n\r\n", 400)
      end)
    end
  end

  it("accepts ordinary Hosts, and HTTP/1.0 without one", function()
    for _, host in ipairs({ "example.com", "Example.COM:8080", "127.0.0.1", "[::1]:8080", "example.com.",
                            "xn--fiqs8s.example", "under_score.example" }) do
      local out = srv:raw("GET /seen HTTP/1.1\r\nHost: " .. host .. "\r\nConnection: close\r\n\r\n")
      local r = H.parse_responses(out)[1]
      assert.equal(200, r.status, host)
      assert.equal(host, cjson.decode(r.body).host)
    end
    -- Whitespace around the value is not part of the host.
    local out = srv:raw("GET /seen HTTP/1.1\r\nHost: \t example.com  \r\nConnection: close\r\n\r\n")
    assert.equal("example.com", cjson.decode(H.parse_responses(out)[1].body).host)
    local r = H.parse_responses((srv:raw("GET /seen HTTP/1.0\r\n\r\n")))[1]
    assert.equal(200, r.status)
    assert.is_nil(cjson.decode(r.body).host)
  end)

  it("400 for HTTP/1.1 without Host, also with an absolute-form target", function()
    expect_refused("GET /hello HTTP/1.1\r\n\r\n", 400)
    expect_refused("GET http://example.com/hello HTTP/1.1\r\n\r\n", 400)
  end)

  for _, target in ipairs({ "http://user@example.com/hello", "http://user:secret@example.com/hello",
                            "https://u:p@example.com", "http://@example.com/hello",
                            "http:///hello", "http://a..b/hello", "http://:80/hello", "http://a\\b/hello" }) do
    it("400 for the absolute-form target " .. target, function()
      expect_refused("GET " .. target .. " HTTP/1.1\r\nHost: example.com\r\n\r\n", 400)
    end)
  end

  it("lets an absolute-form target's authority replace Host (RFC 9112 3.2.2)", function()
    local out = srv:raw("GET http://Real.Example:8080/seen?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
    local seen = cjson.decode(H.parse_responses(out)[1].body)
    assert.same({ path = "/seen", host = "Real.Example:8080" }, seen)
    -- HTTP/1.0 may omit Host: the authority becomes it.
    out = srv:raw("GET https://real.example/seen HTTP/1.0\r\n\r\n")
    seen = cjson.decode(H.parse_responses(out)[1].body)
    assert.same({ path = "/seen", host = "real.example" }, seen)
    -- Pipelined after it, an origin-form request keeps its own Host.
    out = srv:raw("GET http://a.example/seen HTTP/1.1\r\nHost: b.example\r\n\r\n"
      .. "GET /seen HTTP/1.1\r\nHost: c.example\r\nConnection: close\r\n\r\n")
    local rs = H.parse_responses(out)
    assert.equal("a.example", cjson.decode(rs[1].body).host)
    assert.equal("c.example", cjson.decode(rs[2].body).host)
  end)

  for _, case in ipairs({ { "a tab", "/hel\tlo" }, { "a control byte", "/hel\1lo" },
                          { "an escape byte", "/hel\27lo" }, { "DEL", "/hel\127lo" },
                          { "a tab in the query", "/hello?a=\tb" } }) do
    for _, split in ipairs({ false, true }) do
      it("400 for a request target with " .. case[1] .. (split and ", one byte per write" or ""), function()
        expect_refused("GET " .. case[2] .. " HTTP/1.1\r\nHost: x\r\n\r\n", 400, split)
      end)
    end
  end

  for _, split in ipairs({ false, true }) do
    it("413 at once for a chunk size over the body limit" .. (split and ", one byte per write" or ""), function()
      -- No chunk data follows: the unfixed server waited for it until the
      -- body timeout (60 s), far past the 5 s this read waits.
      expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1001\r\n", 413, split)
    end)
  end

  it("413 at once when the chunk sizes add up to more than the body limit", function()
    expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "800\r\n" .. string.rep("a", 2048) .. "\r\n801\r\n", 413)
  end)

  it("accepts chunks that add up to exactly the body limit", function()
    local out = srv:raw("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
      .. "800\r\n" .. string.rep("a", 2048) .. "\r\n800\r\n" .. string.rep("b", 2048) .. "\r\n0\r\n\r\n")
    local r = H.parse_responses(out)[1]
    assert.equal(200, r.status)
    assert.equal(4096, #r.body)
  end)

  local function trace(path)
    local out = srv:raw("TRACE " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return H.parse_responses(out)[1]
  end

  it("405 for TRACE on an app:any() route", function()
    local r = trace("/any")
    assert.equal(405, r.status)
    assert.equal("any GET\n", srv:get("/any").body)
  end)

  it("405 for TRACE where no route names it, with the methods that are allowed", function()
    local r = trace("/hello")
    assert.equal(405, r.status)
    assert.equal("GET, HEAD", r.headers["allow"])
    assert.equal(405, trace("/nowhere").status)
  end)

  it("routes TRACE to a route that names it", function()
    local r = trace("/traced")
    assert.equal(200, r.status)
    assert.equal("traced TRACE\n", r.body)
  end)
end)

describe("the HTTP client's chunked bodies", function()
  it("are refused as too_large as soon as a chunk size takes them over max_body", function()
    local http = require "wxd.http"
    local timer = require "wxd.timer"
    local server = assert(socket.bind("127.0.0.1", 0))
    server:settimeout(0)
    local _, port = server:getsockname()
    local result
    timer.after(0, function()
      local res, err, detail = http.get("http://127.0.0.1:" .. port .. "/", { max_body = 4096, timeout = 30 })
      result = { res = res, err = err, detail = detail }
    end)
    local peer = H.wait_until(function() return server:accept() end, 5, "the client to connect")
    finally(function() peer:close(); server:close() end)
    peer:settimeout(0)
    local got = ""
    H.wait_until(function()
      local data, _, partial = peer:receive(4096)
      got = got .. (data or partial or "")
      return got:find("\r\n\r\n", 1, true)
    end, 5, "the request")
    -- The size line and nothing more: before, the client waited for data
    -- until its read timeout (30 s).
    peer:send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1001\r\n")
    H.wait_until(function() return result end, 5, "the client to give up")
    assert.is_nil(result.res)
    assert.equal("too_large", result.err)
    assert.truthy(result.detail:find("max_body", 1, true), result.detail)
  end)
end)
