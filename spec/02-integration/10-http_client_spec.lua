-- wxd.http against real peers: a wxd app (plain HTTP; it counts the client
-- connections it sees), a raw TCP peer (malformed responses, stalls), and
-- openssl s_server with a CA made here by the openssl CLI (verification,
-- mutual TLS). The client runs in this spec's own process (wxd script),
-- in timers, and in a request handler of another wxd server.
local H = require "helpers"
local wxd = require "wxd"
local http = require "wxd.http"
local timer = require "wxd.timer"
local cjson = require "cjson"

--- Starts `cmd` in `dir` in the background; waits until its output shows
-- `ready`. Returns { pid, log }.
local function start_bg(name, cmd, dir, ready)
  local log = dir .. "/" .. name .. ".log"
  os.execute(string.format("cd %s && (%s >%s 2>&1 </dev/null & echo $! >%s.pid)", dir, cmd, log, log))
  local pid = tonumber(H.read_file(log .. ".pid"):match("%d+"))
  local ok = pcall(H.wait_until, function() return (H.read_file(log) or ""):find(ready, 1, true) end, 10, name)
  if not ok then error(name .. " did not start:\n" .. (H.read_file(log) or "")) end
  return { pid = pid, log = log }
end

local function stop_bg(p)
  if p then os.execute("kill " .. p.pid .. " 2>/dev/null") end
end

--- Runs fn(i) for i = 1..n, each in its own timer coroutine, and waits for
-- all. Returns the elapsed ms and the list of results.
local function concurrently(n, fn)
  local results, done = {}, 0
  local t0 = wxd.monotonic_ms()
  for i = 1, n do
    timer.after(0, function()
      results[i] = { fn(i) }
      done = done + 1
    end)
  end
  H.wait_until(function() return done == n end, 60, n .. " requests")
  return wxd.monotonic_ms() - t0, results
end

describe("wxd.http against a wxd peer", function()
  local srv, base

  local function peer()
    local r = srv:get("/conns")
    return cjson.decode(r.body)
  end
  local function reset() srv:request("POST", "/reset") end

  setup(function()
    srv = H.start(H.app("upstream"))
    base = "http://127.0.0.1:" .. srv.port
  end)
  teardown(function()
    http.configure { max_conns_per_host = 256, max_idle_per_host = 16, idle_timeout = 60 }
    srv:stop()
    srv:cleanup()
  end)

  it("sends the method, headers, query and body, and reads the answer", function()
    local res, err, detail = http.post(base .. "/echo?a=1", "hello", {
      headers = { ["X-Test"] = "yes", ["X-List"] = { "1", "2" }, ["Content-Length"] = "999" },
      query = { b = "x y" },
    })
    assert.is_nil(err, detail)
    assert.equal(200, res.status)
    local echo = cjson.decode(res.body)
    assert.equal("POST", echo.method)
    assert.equal("hello", echo.body)
    assert.equal("a=1&b=x%20y", echo.query)
    assert.equal("yes", echo.headers["x-test"])
    assert.equal("1, 2", echo.headers["x-list"])
    assert.equal("5", echo.headers["content-length"], "the client owns Content-Length")
    assert.equal("127.0.0.1:" .. srv.port, echo.headers.host)
    assert.truthy(echo.headers["user-agent"]:match("^wxd/"))
    assert.equal("application/json", res.headers["content-type"])
    -- PUT with an empty body still says Content-Length: 0.
    res = assert(http.request { method = "put", url = base .. "/echo" })
    echo = cjson.decode(res.body)
    assert.equal("PUT", echo.method)
    assert.equal("0", echo.headers["content-length"])
  end)

  it("reads sized, chunked and large bodies; lists set-cookie, joins other repeats", function()
    local res = assert(http.get(base .. "/chunked?n=4"))
    assert.equal("chunk 1\nchunk 2\nchunk 3\nchunk 4\n", res.body)
    assert.equal("chunked", res.headers["transfer-encoding"])
    res = assert(http.get(base .. "/big?n=" .. 3 * 1024 * 1024))
    assert.equal(3 * 1024 * 1024, #res.body)
    assert.equal(tostring(3 * 1024 * 1024), res.headers["content-length"])
    res = assert(http.get(base .. "/cookies"))
    assert.same({ "a=1; Path=/", "b=2, c; Path=/" }, res.headers["set-cookie"])
    assert.equal("one, two", res.headers["x-multi"])
    res = assert(http.get(base .. "/status/404"))
    assert.equal(404, res.status, "an HTTP error status is a response, not an error")
    res = assert(http.request { method = "HEAD", url = base .. "/big?n=100" })
    assert.equal("100", res.headers["content-length"])
    assert.equal("", res.body)
    res = assert(http.get(base .. "/status/204"))
    assert.equal(204, res.status)
  end)

  it("refuses bodies over max_body, sized or chunked, as too_large", function()
    local res, err, detail = http.get(base .. "/big?n=5000", { max_body = 4096 })
    assert.is_nil(res)
    assert.equal("too_large", err)
    assert.truthy(detail:find("max_body", 1, true))
    res, err = http.get(base .. "/chunked?n=1000", { max_body = 100 })
    assert.is_nil(res)
    assert.equal("too_large", err)
    assert.truthy(http.get(base .. "/big?n=4096", { max_body = 4096 }))
  end)

  it("reuses one keep-alive connection for sequential requests (counted on the peer)", function()
    reset()
    local before = http.stats().reused
    local ports = {}
    for _ = 1, 20 do ports[assert(http.get(base .. "/conn-id")).body] = true end
    local n = 0
    for _ in pairs(ports) do n = n + 1 end
    assert.equal(1, n)
    assert.equal(1, peer().connections)
    assert.is_true(http.stats().reused - before >= 19)
    -- keepalive = false: a connection per request.
    reset()
    for _ = 1, 3 do assert(http.get(base .. "/conn-id", { keepalive = false })) end
    assert.equal(3, peer().connections)
  end)

  it("overlaps 500 concurrent requests from one worker, then reuses their connections", function()
    http.configure { max_conns_per_host = 600, max_idle_per_host = 600 }
    local t0 = wxd.monotonic_ms()
    assert(http.get(base .. "/delay?ms=400"))
    local one = wxd.monotonic_ms() - t0
    reset()
    local ms, results = concurrently(500, function() return http.get(base .. "/delay?ms=400") end)
    for i = 1, 500 do assert(results[i][1], results[i][2] and (results[i][2] .. ": " .. results[i][3])) end
    local seen = peer()
    print(string.format("\n  500 concurrent requests of %.0f ms each: %.0f ms in total, %d connections on the peer",
      one, ms, seen.connections))
    assert.is_true(ms < one + 2000, "500 requests took " .. ms .. " ms; one takes " .. one .. " ms")
    assert.equal(500, seen.connections)
    assert.equal(500, http.stats().idle)
    -- A second wave finds 500 parked connections: the peer sees no new one.
    ms = concurrently(500, function() return http.get(base .. "/delay?ms=400") end)
    seen = peer()
    print(string.format("  again: %.0f ms, still %d connections on the peer (%d requests)",
      ms, seen.connections, seen.requests))
    assert.equal(500, seen.connections)
    assert.equal(1000, seen.requests)
    -- Lowering the limit closes the parked connections beyond it.
    http.configure { max_conns_per_host = 256, max_idle_per_host = 16 }
    assert.equal(16, http.stats().idle)
  end)

  it("holds requests beyond max_conns_per_host in a queue, in order", function()
    http.configure { max_conns_per_host = 2 } -- also bounds the parked ones
    assert.is_true(http.stats().idle <= 2)
    reset()
    local queued = 0
    local ms, results = concurrently(6, function(i)
      if i == 6 then queued = http.stats().queued end
      return http.get(base .. "/delay?ms=200")
    end)
    for i = 1, 6 do assert(results[i][1]) end
    assert.equal(2, peer().connections)
    assert.is_true(queued >= 3, "queued: " .. queued)
    assert.is_true(ms >= 550, "6 requests on 2 connections took only " .. ms .. " ms")
    -- Waiting for a connection counts against the connect timeout.
    http.configure { max_conns_per_host = 1 }
    local _, slow = concurrently(2, function(i)
      if i == 1 then return http.get(base .. "/delay?ms=1000") end
      wxd.sleep(50)
      return http.get(base .. "/conn-id", { timeout = { connect = 0.2 } })
    end)
    assert.truthy(slow[1][1])
    assert.is_nil(slow[2][1])
    assert.equal("timeout", slow[2][2])
    assert.truthy(slow[2][3]:find("connect timeout (0.2 s) waiting for a free connection", 1, true), slow[2][3])
    http.configure { max_conns_per_host = 256 }
  end)

  it("times out reading and in total, each with its own detail", function()
    local res, err, detail = http.get(base .. "/delay?ms=2000", { timeout = { read = 0.2 } })
    assert.is_nil(res)
    assert.equal("timeout", err)
    assert.truthy(detail:find("^read timeout %(0%.2 s%)"), detail)
    res, err, detail = http.get(base .. "/delay?ms=2000", { timeout = 0.3 })
    assert.is_nil(res)
    assert.equal("timeout", err)
    assert.truthy(detail:find("^total timeout %(0%.3 s%)"), detail)
    -- The connection a timed-out request used is closed, never reused.
    assert.truthy(http.get(base .. "/conn-id"))
  end)

  it("leaves redirects to the caller unless asked to follow them", function()
    local res = assert(http.get(base .. "/redirect?n=2"))
    assert.equal(302, res.status)
    assert.equal("/redirect?n=1", res.headers.location)
    res = assert(http.get(base .. "/redirect?n=3", { follow_redirects = true }))
    assert.equal(200, res.status)
    assert.equal("GET", cjson.decode(res.body).method)
    local _, err, detail = http.get(base .. "/redirect?n=3", { follow_redirects = true, max_redirects = 2 })
    assert.equal("protocol", err)
    assert.truthy(detail:find("too many redirects", 1, true))
    -- 303 turns a POST into a GET; 307 keeps method and body.
    res = assert(http.post(base .. "/redirect?to=/redirect&code=303", "data", { follow_redirects = true }))
    assert.same("GET", cjson.decode(res.body).method)
    res = assert(http.post(base .. "/redirect?to=/redirect&code=307", "data", { follow_redirects = true }))
    local body = cjson.decode(res.body)
    assert.equal("POST", body.method)
    assert.equal("data", body.body)
    -- Authorization goes along on the same host, never to another one.
    res = assert(http.get(base .. "/redirect?to=/redirect",
      { follow_redirects = true, headers = { Authorization = "Bearer t" } }))
    assert.equal("Bearer t", cjson.decode(res.body).authorization)
    local other = "http://localhost:" .. srv.port .. "/redirect"
    res = assert(http.get(base .. "/redirect?to=" .. other,
      { follow_redirects = true, headers = { Authorization = "Bearer t" } }))
    assert.is_nil(cjson.decode(res.body).authorization)
  end)

  it("notices a parked connection the peer closed, and opens another", function()
    local basic = H.start(H.app("basic")) -- keep-alive timeout: 1 s
    finally(function() basic:stop(); basic:cleanup() end)
    local url = "http://127.0.0.1:" .. basic.port .. "/hello"
    assert.equal("hello world\n", assert(http.get(url)).body)
    local opened = http.stats().opened
    wxd.sleep(1400)
    assert.equal("hello world\n", assert(http.get(url)).body)
    assert.equal(opened + 1, http.stats().opened)
  end)

  it("closes parked connections after the idle timeout", function()
    http.configure { idle_timeout = 0.2 }
    reset()
    assert(http.get(base .. "/conn-id"))
    wxd.sleep(400)
    assert(http.get(base .. "/conn-id"))
    assert.equal(2, peer().connections)
    http.configure { idle_timeout = 60 }
  end)

  it("works in a request handler, on a pool that survives hot reloads", function()
    local client = H.start(H.app("upstream"), { pid = true })
    finally(function() client:stop(); client:cleanup() end)
    local path = "/proxy?port=" .. srv.port .. "&path=%2Fconn-id"
    reset()
    local first = cjson.decode(client:get(path).body)
    assert.equal(200, first.status)
    assert.equal(1, first.generation)
    assert.equal(first.body, cjson.decode(client:get(path).body).body)
    client:signal("HUP")
    local after
    H.wait_until(function()
      after = cjson.decode(client:get(path).body)
      return after.generation == 2
    end, 10, "generation 2")
    assert.equal(first.body, after.body, "the new generation got the same connection")
    assert.equal(1, peer().connections)
    assert.equal(0, client:stop())
  end)

  it("lets a shutdown deadline cancel a request that still waits", function()
    local client = H.start(H.app("upstream"))
    finally(function() client:stop(); client:cleanup() end)
    local c = client:connect()
    c:send("GET /proxy?port=" .. srv.port .. "&path=%2Fdelay%3Fms%3D8000 HTTP/1.1\r\nHost: x\r\n\r\n")
    wxd.sleep(200)
    local t0 = wxd.monotonic_ms()
    assert.equal(0, client:stop()) -- shutdown_timeout_ms = 1000
    assert.is_true(wxd.monotonic_ms() - t0 < 5000)
    c:close()
  end)
end)

describe("wxd.http against a raw peer", function()
  local canned, base

  setup(function()
    canned = H.raw_peer("canned")
    base = canned.base
  end)
  teardown(function()
    if canned then canned.stop() end
  end)

  local function fails(path, kind, pattern, opts)
    local res, err, detail = http.get(base .. path, opts)
    assert.is_nil(res, path .. " should fail")
    assert.equal(kind, err, path .. ": " .. tostring(detail))
    if pattern then assert.truthy(detail:find(pattern), path .. ": " .. detail) end
  end

  it("refuses what the server side refuses: obs-fold, bare LF or CR, spaces in names", function()
    assert.equal("ok", assert(http.get(base .. "/ok")).body)
    fails("/obs-fold", "protocol", "malformed response head")
    fails("/bare-lf", "protocol")
    fails("/bare-cr", "protocol")
    fails("/space-name", "protocol")
    fails("/space-colon", "protocol")
  end)

  it("refuses bad status lines, ambiguous framing and other protocols", function()
    fails("/bad-status", "protocol")
    fails("/garbage", "protocol")
    fails("/cl-te", "protocol")
    fails("/two-cl", "protocol")
    fails("/upgrade", "protocol", "101")
    fails("/http2", "protocol")
  end)

  it("checks chunk framing and trailers", function()
    local res = assert(http.get(base .. "/chunked"))
    assert.equal("abcdefg", res.body)
    assert.is_nil(res.headers["x-trailer"], "trailers never become headers")
    fails("/chunk-no-crlf", "protocol", "chunked")
    fails("/chunk-bare-lf", "protocol")
    fails("/chunk-obs-trailer", "protocol")
  end)

  it("bounds header and body bytes", function()
    fails("/big-head", "too_large", "headers too large")
    assert.truthy(http.get(base .. "/big-head", { max_header_bytes = 200 * 1024 }))
    fails("/cl-big", "too_large", "max_body", { max_body = 1000 })
    fails("/chunked-big", "too_large", "max_body", { max_body = 4000 })
    assert.equal(8192, #assert(http.get(base .. "/chunked-big", { max_body = 8192 })).body)
  end)

  it("reads a body that ends with the connection, skips 1xx, knows HEAD", function()
    local res = assert(http.get(base .. "/eof-body"))
    assert.equal("until the peer closes", res.body)
    assert.equal("eof", res.headers["x-kind"])
    res = assert(http.get(base .. "/interim"))
    assert.equal(200, res.status)
    assert.equal("final", res.body)
    assert.is_nil(res.headers.link, "an interim response's headers are not the answer's")
    res = assert(http.request { method = "HEAD", url = base .. "/head" })
    assert.equal("1234", res.headers["content-length"])
    assert.equal("", res.body)
    assert.equal(204, assert(http.get(base .. "/204")).status)
  end)

  it("reports a response cut short, or none at all", function()
    fails("/short", "protocol", "before the response ended")
    fails("/no-response", "protocol", "without a response")
  end)

  it("sends an idempotent request again when a reused connection drops it, never a POST", function()
    local drop = H.raw_peer("drop")
    finally(function() drop.stop() end)
    local port = drop.port
    local u = "http://127.0.0.1:" .. port .. "/"
    assert.equal("first", assert(http.get(u)).body)
    local opened = http.stats().opened
    -- Parked and alive; the peer drops it when the second GET arrives: the
    -- GET goes again on a new connection.
    local res, err, detail = http.get(u)
    assert.is_nil(err, detail)
    assert.equal("first", res.body)
    assert.equal(opened + 1, http.stats().opened)
    -- A POST is not repeated: the server may have acted on it.
    res, err, detail = http.post(u, "")
    assert.is_nil(res)
    assert.equal("protocol", err)
    assert.truthy(detail:find("without a response", 1, true), detail)
  end)

  it("times out sending to a peer that stopped reading", function()
    local stall = H.raw_peer("stall")
    finally(function() stall.stop() end)
    local port = stall.port
    local res, err, detail = http.post("http://127.0.0.1:" .. port .. "/", string.rep("b", 32 * 1024 * 1024),
      { timeout = { send = 0.5 } })
    assert.is_nil(res)
    assert.equal("timeout", err)
    assert.truthy(detail:find("^send timeout %(0%.5 s%)"), detail)
  end)

  it("times out a TLS handshake the peer never answers (connect timeout)", function()
    local silent = H.raw_peer("silent")
    finally(function() silent.stop() end)
    local port = silent.port
    local res, err, detail = http.get("https://127.0.0.1:" .. port .. "/", { timeout = { connect = 0.3 } })
    assert.is_nil(res)
    assert.equal("timeout", err)
    assert.truthy(detail:find("^connect timeout %(0%.3 s%) connecting to 127%.0%.0%.1"), detail)
  end)
end)

describe("wxd.http over TLS against openssl s_server", function()
  local dir, peers, port = nil, {}, {}
  local ca

  local function read(name) return assert(H.read_file(dir .. "/" .. name)) end
  local function url(which, host) return "https://" .. (host or "localhost") .. ":" .. port[which] .. "/hello.txt" end

  setup(function()
    dir = H.tmpdir()
    -- A CA, and certificates it signs: valid (localhost, 127.0.0.1),
    -- expired, for another name; a client certificate as a PEM pair and as
    -- PKCS#12 bundles (modern, and legacy RC2 as WeChat Pay issues them);
    -- an unrelated CA and a self-signed client.
    local out, code = H.sh(string.format([[
      set -e; cd %s
      ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      openssl req -x509 $ec -keyout ca.key -out ca.pem -subj /CN=wxd-test-ca -days 2
      openssl req -x509 $ec -keyout other-ca.key -out other-ca.pem -subj /CN=other-ca -days 2
      sign() { # name days san
        openssl req -new $ec -keyout $1.key -out $1.csr -subj /CN=$1
        printf 'subjectAltName=%%s\n' "$3" > $1.ext
        openssl x509 -req -in $1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days $2 -extfile $1.ext -out $1.pem
      }
      sign good 2 DNS:localhost,IP:127.0.0.1
      sign expired -1 DNS:localhost,IP:127.0.0.1
      sign wrong 2 DNS:wrong.example
      sign client 2 DNS:client
      openssl pkcs12 -export -inkey client.key -in client.pem -passout pass:1900009191 -out client.p12
      openssl pkcs12 -export -legacy -inkey client.key -in client.pem -passout pass:1900009191 -out legacy.p12
      openssl req -x509 $ec -keyout stranger.key -out stranger.pem -subj /CN=stranger -days 2
      echo hello > hello.txt
    ]], dir))
    assert(code == 0, out)
    ca = dir .. "/ca.pem"
    for _, p in ipairs {
      { "good", "good", "" },
      { "expired", "expired", "" },
      { "wrong", "wrong", "" },
      { "mtls", "good", "-Verify 1 -verify_return_error -CAfile ca.pem" },
    } do
      port[p[1]] = H.free_port()
      peers[#peers + 1] = start_bg(p[1], string.format(
        "openssl s_server -accept 127.0.0.1:%d -cert %s.pem -key %s.key -WWW %s", port[p[1]], p[2], p[2], p[3]),
        dir, "ACCEPT")
    end
  end)
  teardown(function()
    for _, p in ipairs(peers) do stop_bg(p) end
    os.execute("rm -rf " .. dir)
  end)

  local function tls_fails(u, opts, pattern)
    local res, err, detail = http.get(u, opts)
    assert.is_nil(res, u .. " should fail")
    assert.equal("tls", err, tostring(detail))
    if pattern then assert.truthy(detail:find(pattern, 1, true), detail) end
    return detail
  end

  it("verifies the chain and the host name (DNS and IP), and reads the body to close_notify", function()
    local res, err, detail = http.get(url("good"), { ca_file = ca })
    assert.is_nil(err, detail)
    assert.equal(200, res.status)
    assert.equal("hello\n", res.body)
    assert.equal("hello\n", assert(http.get(url("good", "127.0.0.1"), { ca_file = ca })).body)
  end)

  it("refuses a chain from another CA, or one the system store does not know", function()
    tls_fails(url("good"), { ca_file = dir .. "/other-ca.pem" }, "certificate verify failed: unable to get local issuer")
    tls_fails(url("good"), nil, "certificate verify failed")
  end)

  it("refuses an expired certificate and a wrong host name", function()
    tls_fails(url("expired"), { ca_file = ca }, "certificate has expired")
    tls_fails(url("wrong"), { ca_file = ca }, "hostname mismatch")
    tls_fails(url("wrong", "127.0.0.1"), { ca_file = ca }, "IP address mismatch")
  end)

  it("skips verification only when told, and warns once per host", function()
    local script = dir .. "/noverify.lua"
    H.write_file(script, string.format([[
      local http = require "wxd.http"
      for _ = 1, 3 do assert(http.get(%q, { verify = false })) end
      assert(http.get(%q, { verify = false }))
    ]], url("expired"), url("wrong")))
    local out, code = H.sh(H.WXD .. " script " .. script)
    assert.equal(0, code, out)
    local n = 0
    for _ in out:gmatch("TLS certificate verification is off") do n = n + 1 end
    assert.equal(1, n, out) -- the same host: one warning
  end)

  it("fails mutual TLS without a client certificate, or with one the peer does not trust", function()
    tls_fails(url("mtls"), { ca_file = ca }, "certificate required")
    tls_fails(url("mtls"), { ca_file = ca, client_cert = { cert = read("stranger.pem"), key = read("stranger.key") } })
  end)

  it("passes mutual TLS with a PEM pair or a PKCS#12 bundle (modern or legacy)", function()
    for _, cc in ipairs {
      { cert = read("client.pem"), key = read("client.key") },
      { pkcs12 = read("client.p12"), passphrase = "1900009191" },
      { pkcs12 = read("legacy.p12"), passphrase = "1900009191" },
    } do
      local res, err, detail = http.get(url("mtls"), { ca_file = ca, client_cert = cc })
      assert.is_nil(err, detail)
      assert.equal("hello\n", res.body)
    end
    local detail = tls_fails(url("mtls"), { ca_file = ca,
      client_cert = { pkcs12 = read("legacy.p12"), passphrase = "wrong-passphrase" } }, "passphrase")
    assert.is_nil(detail:find("wrong-passphrase", 1, true), "the passphrase is never in an error")
  end)
end)

describe("wxd.http keeps TLS connections alive (nginx as the peer)", function()
  local dir, nginx, port, mport
  local has_nginx = select(2, H.sh("command -v nginx")) == 0 -- make deps-bench installs it

  setup(function()
    if not has_nginx then return end
    dir = H.tmpdir()
    local out, code = H.sh(string.format([[
      set -e; cd %s; mkdir -p tmp
      ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      openssl req -x509 $ec -keyout ca.key -out ca.pem -subj /CN=wxd-test-ca -days 2
      for n in server client; do
        openssl req -new $ec -keyout $n.key -out $n.csr -subj /CN=$n
        printf 'subjectAltName=DNS:localhost\n' > $n.ext
        openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $n.ext -out $n.pem
      done
      openssl pkcs12 -export -legacy -inkey client.key -in client.pem -passout pass:1900009191 -out client.p12
    ]], dir))
    assert(code == 0, out)
    port, mport = H.free_port(), H.free_port()
    -- $connection is nginx's serial number of the connection: one number,
    -- one TLS connection.
    H.write_file(dir .. "/nginx.conf", (string.gsub([[
      worker_processes 1;
      daemon off;
      pid DIR/nginx.pid;
      error_log DIR/error.log;
      events { worker_connections 256; }
      http {
        access_log off;
        client_body_temp_path DIR/tmp; proxy_temp_path DIR/tmp; fastcgi_temp_path DIR/tmp;
        uwsgi_temp_path DIR/tmp; scgi_temp_path DIR/tmp;
        keepalive_timeout 60s;
        keepalive_requests 10000;
        ssl_certificate DIR/server.pem;
        ssl_certificate_key DIR/server.key;
        server { listen 127.0.0.1:PORT ssl; location / { return 200 "$connection"; } }
        server {
          listen 127.0.0.1:MPORT ssl;
          ssl_verify_client on;
          ssl_client_certificate DIR/ca.pem;
          location / { return 200 "$connection $ssl_client_s_dn"; }
        }
      }
    ]], "%u+", { DIR = dir, PORT = tostring(port), MPORT = tostring(mport) })))
    start_bg("nginx", "nginx -p " .. dir .. " -c " .. dir .. "/nginx.conf", dir, "")
    H.wait_until(function()
      local c = require("socket").connect("127.0.0.1", mport)
      if c then c:close() return true end
    end, 10, "nginx")
    nginx = true
  end)
  teardown(function()
    if not nginx then return end
    local pid = H.read_file(dir .. "/nginx.pid")
    if pid then os.execute("kill " .. pid:match("%d+") .. " 2>/dev/null") end
    H.wait_until(function() return not H.read_file(dir .. "/nginx.pid") end, 10, "nginx to stop")
    os.execute("rm -rf " .. dir)
  end)

  it("reuses one TLS connection for sequential requests, and the pool for concurrent ones", function()
    if not has_nginx then pending("nginx is not installed") return end
    local url = "https://localhost:" .. port .. "/"
    local seen = {}
    for _ = 1, 10 do
      local res, err, detail = http.get(url, { ca_file = dir .. "/ca.pem" })
      assert.is_nil(err, detail)
      seen[res.body] = true
    end
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.equal(1, n, "10 requests, one TLS connection")
    local function wave() -- 12: within max_idle_per_host (16), all are parked after
      local _, results = concurrently(12, function() return http.get(url, { ca_file = dir .. "/ca.pem" }) end)
      local ids = {}
      for i = 1, 12 do ids[assert(results[i][1]).body] = true end
      return ids
    end
    local first, second = wave(), wave()
    for id in pairs(second) do assert.truthy(first[id], "connection " .. id .. " is new in the second wave") end
  end)

  it("keeps a mutual TLS connection per client certificate", function()
    if not has_nginx then pending("nginx is not installed") return end
    local url = "https://localhost:" .. mport .. "/"
    local p12 = { pkcs12 = H.read_file(dir .. "/client.p12"), passphrase = "1900009191" }
    -- Without a certificate nginx completes the handshake and answers 400.
    assert.equal(400, assert(http.get(url, { ca_file = dir .. "/ca.pem" })).status)
    local ids = {}
    for _ = 1, 5 do
      local res, e, detail = http.get(url, { ca_file = dir .. "/ca.pem", client_cert = p12 })
      assert.is_nil(e, detail)
      assert.truthy(res.body:find("CN=client", 1, true), res.body)
      ids[res.body] = true
    end
    local n = 0
    for _ in pairs(ids) do n = n + 1 end
    assert.equal(1, n)
  end)
end)
