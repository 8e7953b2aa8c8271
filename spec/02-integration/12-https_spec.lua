-- HTTPS listeners: real wxd servers with certificates made here by the
-- openssl CLI, talked to with curl, openssl s_client, wxd.http and raw
-- sockets. The app (spec/fixtures/apps/https) is copied to a temp dir with
-- a certs/ folder; variants come from the environment its config.lua reads.
local H = require "helpers"
local wxd = require "wxd"
local http = require "wxd.http"
local cjson = require "cjson"
local socket = require "socket"

local certs -- the directory of the certificates, made once

local function make_certs()
  local dir = H.tmpdir()
  local out, code = H.sh(string.format([[
    set -e; cd %s
    ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    openssl req -x509 $ec -keyout ca.key -out ca.pem -subj /CN=wxd-test-ca -days 2
    openssl req -x509 $ec -keyout other-ca.key -out other-ca.pem -subj /CN=other-ca -days 2
    sign() { # name subject san ca
      openssl req -new $ec -keyout $1.key -out $1.csr -subj "$2"
      printf 'subjectAltName=%%s\n' "$3" > $1.ext
      openssl x509 -req -in $1.csr -CA $4.pem -CAkey $4.key -CAcreateserial -days 2 -extfile $1.ext -out $1.pem
    }
    sign server /CN=localhost DNS:localhost,IP:127.0.0.1 ca
    sign server2 /O=Rotated/CN=localhost DNS:localhost,IP:127.0.0.1 ca
    sign client "/O=Shop/CN=client" DNS:client ca
    sign stranger /CN=stranger DNS:stranger other-ca
    # RSA, with the chain in the same file, and an encrypted copy of its key.
    openssl req -new -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.csr -subj /CN=localhost
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > rsa.ext
    openssl x509 -req -in rsa.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile rsa.ext -out rsa.pem
    cat ca.pem >> rsa.pem
    openssl pkey -in rsa.key -aes256 -passout pass:s3cret-pass -out rsa-enc.key
    echo "not a certificate" > garbage.pem
  ]], dir))
  assert(code == 0, out)
  return dir
end

--- A copy of the fixture app with the certificates in certs/.
local function app_copy()
  local dir = H.tmpdir()
  assert(os.execute(string.format("cp -r %s/. %s/ && mkdir -p %s/certs && cp %s/*.pem %s/*.key %s/certs/",
    H.app("https"), dir, dir, certs, certs, dir)))
  return dir
end

--- Starts wxd on the app with both listeners; srv.https_port is the TLS one.
local function start(appdir, opts)
  opts = opts or {}
  local hport = H.free_port()
  opts.args = (opts.args or "") .. " --https-listen 127.0.0.1:" .. hport
  local srv = H.start(appdir, opts)
  srv.https_port = hport
  srv.base = "https://127.0.0.1:" .. hport
  return srv
end

local function curl(args)
  return H.sh("curl -sS --max-time 10 " .. args)
end

--- openssl s_client with `input` on stdin (kept open `hold` seconds);
-- returns its output and exit code.
local function s_client(port, args, input, hold)
  local f = os.tmpname()
  H.write_file(f, input or "")
  local out, code = H.sh(string.format("(cat %s; sleep %s) | timeout 10 openssl s_client -connect 127.0.0.1:%d %s 2>&1",
    f, hold or 0.3, port, args or ""))
  os.remove(f)
  return out, code
end

--- Whether a TLS handshake with these s_client options succeeds.
local function handshake_ok(port, args)
  local out = s_client(port, "-brief " .. (args or ""), "", 0.2)
  return out:find("CONNECTION ESTABLISHED", 1, true) ~= nil, out
end

local function server_cert(port)
  local out, code = H.sh(string.format(
    "echo | timeout 10 openssl s_client -connect 127.0.0.1:%d -showcerts 2>/dev/null"
      .. " | openssl x509 -noout -subject -serial", port))
  assert(code == 0, out)
  return out
end

local function cert_field(file, what) -- what: "subject" or "serial"
  local out = H.sh(string.format("openssl x509 -in %s -noout -%s -nameopt RFC2253", file, what))
  return (out:gsub("^%w+=%s*", ""):gsub("%s+$", ""))
end

setup(function() certs = make_certs() end)
teardown(function() if certs then os.execute("rm -rf " .. certs) end end)

describe("HTTPS listener", function()
  local srv, app

  setup(function()
    app = app_copy()
    srv = start(app, { env = "WXD_LOG_LEVEL=debug", pid = true })
  end)
  teardown(function()
    srv:stop()
    srv:cleanup()
    os.execute("rm -rf " .. app)
  end)

  it("answers GET and POST over TLS, next to plain HTTP", function()
    local out, code = curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello")
    assert.equal(0, code, out)
    assert.equal("hello world\n", out)
    out, code = curl("--cacert " .. certs .. "/ca.pem https://localhost:" .. srv.https_port .. "/hello")
    assert.equal(0, code, out)
    assert.equal("hello world\n", out)
    local body = string.rep("0123456789", 10000)
    H.write_file(app .. "/body.txt", body)
    out, code = curl("--cacert " .. certs .. "/ca.pem --data-binary @" .. app .. "/body.txt " .. srv.base .. "/echo")
    assert.equal(0, code)
    assert.equal(body, out)
    assert.equal("hello world\n", srv:get("/hello").body)
    -- The spec's certificates are valid for 2 days: wxd warns.
    assert.truthy(srv:log_text():find("https: the certificate in " .. app .. "/certs/server.pem expires in", 1, true))
  end)

  it("tells the handler about TLS: req.tls and req.scheme", function()
    local out = curl("--cacert " .. certs .. "/ca.pem https://localhost:" .. srv.https_port .. "/tls")
    local t = cjson.decode(out)
    assert.equal("https", t.scheme)
    assert.equal("TLSv1.3", t.tls.version)
    assert.truthy(t.tls.cipher:find("^TLS_"), t.tls.cipher)
    assert.equal("localhost", t.tls.server_name)
    assert.is_false(t.tls.client_verified)
    assert.is_nil(t.tls.client_subject)
    t = cjson.decode((curl("--cacert " .. certs .. "/ca.pem --tls-max 1.2 " .. srv.base .. "/tls")))
    assert.equal("TLSv1.2", t.tls.version)
    assert.truthy(t.tls.cipher:find("^ECDHE%-ECDSA%-") and t.tls.cipher:find("GCM") or t.tls.cipher:find("CHACHA"),
      t.tls.cipher)
    assert.is_nil(t.tls.server_name, "no SNI for an IP address")
    t = cjson.decode(srv:get("/tls").body)
    assert.equal("http", t.scheme)
    assert.is_false(t.tls)
  end)

  it("keeps a connection alive for several requests, and answers pipelined ones in order", function()
    -- curl reuses its connection for the URLs of one command line.
    local out = curl(string.format("--cacert %s/ca.pem -w ' %%{num_connects}\\n' %s/tls %s/tls %s/tls",
      certs, srv.base, srv.base, srv.base))
    local ports, connects = {}, 0
    for json, n in out:gmatch("(%b{}) (%d)") do
      ports[cjson.decode(json).remote_port] = true
      connects = connects + tonumber(n)
    end
    assert.equal(1, connects, out)
    assert.equal(1, #(function() local l = {} for p in pairs(ports) do l[#l + 1] = p end return l end)())
    -- Three requests in one write; the last closes.
    local req = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping"
      .. "GET /stream?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = s_client(srv.https_port, "-quiet", req, 1)
    local rs = H.parse_responses(out:sub((out:find("HTTP/1.1", 1, true))))
    assert.equal(3, #rs)
    assert.equal("hello world\n", rs[1].body)
    assert.equal("ping", rs[2].body)
    assert.equal("11111111\n22222222\n", rs[3].body)
    assert.equal("close", rs[3].headers.connection)
    -- wxd.http's pool: one connection for sequential requests.
    local before = http.stats().reused
    for _ = 1, 5 do
      local res, err, detail = http.get(srv.base .. "/hello", { ca_file = certs .. "/ca.pem" })
      assert.is_nil(err, detail)
      assert.equal("hello world\n", res.body)
    end
    assert.is_true(http.stats().reused - before >= 4)
  end)

  it("sends large and streamed bodies whole", function()
    local res, err, detail = http.get(srv.base .. "/big?n=" .. 3 * 1024 * 1024, { ca_file = certs .. "/ca.pem" })
    assert.is_nil(err, detail)
    assert.equal(3 * 1024 * 1024, #res.body)
    res = assert(http.get(srv.base .. "/stream?n=50&size=20000", { ca_file = certs .. "/ca.pem" }))
    assert.equal(50 * 20001, #res.body)
    assert.equal("chunked", res.headers["transfer-encoding"])
  end)

  it("waits for a slow reader while streaming, and drops one that stopped reading", function()
    -- s_client's stdout goes to a pipe nobody reads: it stops reading the
    -- socket once the pipe is full.
    os.execute(string.format("((printf 'GET /firehose HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'; sleep 6) | "
      .. "timeout 8 openssl s_client -quiet -connect 127.0.0.1:%d 2>/dev/null | sleep 8) >/dev/null 2>&1 &",
      srv.https_port))
    local ca = { ca_file = certs .. "/ca.pem" }
    H.wait_until(function() return assert(http.get(srv.base .. "/firehose/result", ca)).body == "running" end, 5)
    local t0 = wxd.monotonic_ms()
    H.wait_until(function() return assert(http.get(srv.base .. "/firehose/result", ca)).body ~= "running" end, 6,
      "the send timeout")
    assert.equal("stopped: closed", assert(http.get(srv.base .. "/firehose/result", ca)).body)
    assert.is_true(wxd.monotonic_ms() - t0 < 4000)
  end)

  it("refuses TLS 1.1 and accepts 1.2 and 1.3", function()
    local ok, out = handshake_ok(srv.https_port, "-tls1_1")
    assert.is_false(ok, out)
    assert.truthy(handshake_ok(srv.https_port, "-tls1_2"))
    assert.truthy(handshake_ok(srv.https_port, "-tls1_3"))
    -- TLS 1.2 suites without forward secrecy or AEAD are not offered.
    ok, out = handshake_ok(srv.https_port, "-tls1_2 -cipher AES128-SHA256")
    assert.is_false(ok, out)
    -- A client's renegotiation (s_client's "R" command) is refused.
    out = s_client(srv.https_port, "-tls1_2", "R\n", 1)
    assert.truthy(out:find("RENEGOTIATING", 1, true), out)
    assert.truthy(out:find("no renegotiation", 1, true), out)
    -- ALPN: http/1.1 when offered, nothing for an h2-only client.
    out = s_client(srv.https_port, "-alpn h2,http/1.1", "", 0.2)
    assert.truthy(out:find("ALPN protocol: http/1.1", 1, true), out)
    out = s_client(srv.https_port, "-alpn h2", "", 0.2)
    assert.truthy(out:find("No ALPN negotiated", 1, true), out)
  end)

  it("closes a connection that speaks plain HTTP to the TLS port, and keeps serving", function()
    local c = assert(socket.connect("127.0.0.1", srv.https_port))
    c:send("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    local out, closed = H.read_all(c, 3)
    c:close()
    assert.is_true(closed)
    assert.is_nil(out:find("HTTP/1.1", 1, true))
    H.wait_until(function() return srv:log_text():find('"msg":"tls handshake failed"', 1, true) end, 3)
    assert.truthy(srv:log_text():find('"error":"http request"', 1, true))
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello"))
  end)

  it("closes a silent client, or a stalled handshake, after the header timeout", function()
    for _, first in ipairs { "", "\22\3\1\0\200\1\0\0" } do
      local c = assert(socket.connect("127.0.0.1", srv.https_port))
      if first ~= "" then c:send(first) end
      local t0 = socket.gettime()
      c:settimeout(5)
      local data, err = c:receive(1)
      local elapsed = socket.gettime() - t0
      c:close()
      assert.is_nil(data)
      assert.equal("closed", err)
      assert.is_true(elapsed > 0.3 and elapsed < 2, "closed after " .. elapsed .. " s")
    end
    -- Handshake bytes do not extend the deadline: a ClientHello dripped a
    -- byte at a time is cut at the header timeout too.
    local c = assert(socket.connect("127.0.0.1", srv.https_port))
    c:settimeout(0.15)
    local t0, hello, closed = socket.gettime(), "\22\3\1\2\0\1\0\1\252\3\3" .. string.rep("\0", 40), false
    for i = 1, #hello do
      if not c:send(hello:sub(i, i)) then closed = true break end
      local _, err = c:receive(1)
      if err == "closed" then closed = true break end
    end
    local elapsed = socket.gettime() - t0
    c:close()
    assert.is_true(closed, "still open after " .. elapsed .. " s")
    assert.is_true(elapsed < 2, "closed after " .. elapsed .. " s")
  end)

  it("survives a client that cuts the connection mid-request or mid-record", function()
    -- A request cut short, then the client goes away (-quiet implies
    -- -ign_eof: no close_notify; close_notify is the next spec's).
    local out = s_client(srv.https_port, "-quiet", "GET /hello HTTP/1.1\r\nHost:", 0.2)
    assert.is_nil(out:find("HTTP/1.1 200", 1, true))
    -- A TLS record cut short (raw bytes after a real handshake are not
    -- possible from here): a truncated ClientHello, then EOF.
    local c = assert(socket.connect("127.0.0.1", srv.https_port))
    c:send("\22\3\1\2\0\1\0\1\252\3\3")
    c:close()
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello"))
  end)

  it("ends a response with close_notify, but not one cut short (HTTP/1.0 streams are close-delimited)", function()
    -- s_client prints "closed" only when the server's close_notify arrives.
    local req = "GET %s HTTP/1.0\r\nHost: x\r\n\r\n"
    local out = s_client(srv.https_port, "-ign_eof", req:format("/hello"), 0.5)
    assert.truthy(out:find("hello world", 1, true), out)
    assert.truthy(out:find("\nclosed", 1, true), out)
    out = s_client(srv.https_port, "-ign_eof", req:format("/cut"), 0.5)
    assert.truthy(out:find(string.rep("c", 1000), 1, true), out)
    assert.is_nil(out:find("\nclosed", 1, true), "a truncated body must not look complete: " .. out)
  end)

  it("answers a request followed by close_notify, and closes at once on close_notify mid-request", function()
    local count = function(pat) local _, n = srv:log_text():gsub(pat, "") return n end
    local answered = count('"path":"/tls","status":200')
    -- s_client sends close_notify at the end of its stdin (no -quiet, no -ign_eof).
    s_client(srv.https_port, "", "GET /tls HTTP/1.1\r\nHost: x\r\n\r\n", 0)
    H.wait_until(function() return count('"path":"/tls","status":200') == answered + 1 end, 3)
    local timeouts = count('"status":408')
    s_client(srv.https_port, "", "GET /hello HTTP/1.1\r\nHost:", 0)
    socket.sleep(1) -- past the header timeout (600 ms)
    assert.equal(timeouts, count('"status":408'), "closed on close_notify, not by the header timeout")
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello"))
  end)

  it("hot reload reads the certificate again; open connections keep theirs", function()
    local ca = { ca_file = certs .. "/ca.pem" }
    local before = cjson.decode(assert(http.get(srv.base .. "/tls", ca)).body)
    assert.equal(cert_field(certs .. "/server.pem", "serial"), server_cert(srv.https_port):match("serial=(%x+)"))
    -- Rotate the files in place, as a certificate renewal does.
    os.execute(string.format("cp %s/server2.pem %s/certs/server.pem && cp %s/server2.key %s/certs/server.key",
      certs, app, certs, app))
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    local seen = server_cert(srv.https_port)
    assert.equal(cert_field(certs .. "/server2.pem", "serial"), seen:match("serial=(%x+)"))
    assert.truthy(seen:find("O = Rotated", 1, true), seen)
    -- The pooled keep-alive connection from before the reload still works,
    -- on the new generation.
    local after = cjson.decode(assert(http.get(srv.base .. "/tls", ca)).body)
    assert.equal(before.remote_port, after.remote_port)
    assert.equal(before.generation + 1, after.generation)
    -- A broken certificate refuses the reload; the previous one serves on.
    H.write_file(app .. "/certs/server.pem", "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(1, code, out)
    assert.truthy(out:find("certificate file " .. app .. "/certs/server.pem holds no PEM certificate", 1, true), out)
    assert.equal(cert_field(certs .. "/server2.pem", "serial"), server_cert(srv.https_port):match("serial=(%x+)"))
    os.execute(string.format("cp %s/server2.key %s/certs/server.pem", certs, app)) -- a key is no certificate
    out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(1, code, out)
    os.execute(string.format("cp %s/server.pem %s/certs/server.pem", certs, app)) -- does not match server2.key
    out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(1, code, out)
    assert.truthy(out:find("does not match the certificate", 1, true), out)
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello"))
    -- The status tells where HTTPS listens; moving it needs a restart.
    local status = cjson.decode(H.read_file(srv.dir .. "/wxd.pid.status"))
    assert.equal("127.0.0.1:" .. srv.https_port, status.https)
    os.execute(string.format("cp %s/server2.pem %s/certs/server.pem", certs, app))
    local conf = H.read_file(app .. "/config.lua")
    H.write_file(app .. "/config.lua", (conf:gsub("127%.0%.0%.1:8443", "127.0.0.1:8444")))
    out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    assert.truthy(out:find("https.listen", 1, true) and out:find("restart", 1, true), out)
    assert.same({ "https.listen" }, cjson.decode(H.read_file(srv.dir .. "/wxd.pid.status")).restart_needed)
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/hello"))
  end)
end)

describe("HTTPS with client certificates", function()
  local app
  setup(function() app = app_copy() end)
  teardown(function() os.execute("rm -rf " .. app) end)

  local function with_client(cert)
    return string.format("--cacert %s/ca.pem --cert %s/%s.pem --key %s/%s.key ", certs, certs, cert, certs, cert)
  end

  it("client_verify = require: a certificate from client_ca gets in, others and none are refused", function()
    local srv = start(app, { env = "WXD_TEST_CLIENT_VERIFY=require" })
    finally(function() srv:stop() srv:cleanup() end)
    local out, code = curl(with_client("client") .. srv.base .. "/tls")
    assert.equal(0, code, out)
    local t = cjson.decode(out).tls
    assert.is_true(t.client_verified)
    assert.equal("CN=client,O=Shop", t.client_subject)
    assert.equal(cert_field(certs .. "/client.pem", "subject"), t.client_subject)
    assert.equal("CN=wxd-test-ca", t.client_issuer)
    assert.equal(cert_field(certs .. "/client.pem", "serial"), t.client_serial)
    out, code = curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/tls")
    assert.are_not.equal(0, code, out)
    out, code = curl(with_client("stranger") .. srv.base .. "/tls")
    assert.are_not.equal(0, code, out)
    -- The same with wxd.http, and with TLS 1.2 (refused in the handshake).
    local res, err = http.get(srv.base .. "/tls", { ca_file = certs .. "/ca.pem" })
    assert.is_nil(res)
    assert.equal("tls", err)
    assert.is_false((handshake_ok(srv.https_port, "-tls1_2")))
    assert.truthy(handshake_ok(srv.https_port,
      string.format("-tls1_2 -cert %s/client.pem -key %s/client.key", certs, certs)))
    assert.equal("hello world\n", srv:get("/hello").body, "plain HTTP is not affected")
  end)

  it("client_verify = optional: no certificate is fine, a bad one is not", function()
    local srv = start(app, { env = "WXD_TEST_CLIENT_VERIFY=optional" })
    finally(function() srv:stop() srv:cleanup() end)
    local t = cjson.decode((curl("--cacert " .. certs .. "/ca.pem " .. srv.base .. "/tls"))).tls
    assert.is_false(t.client_verified)
    assert.is_nil(t.client_subject)
    t = cjson.decode((curl(with_client("client") .. srv.base .. "/tls"))).tls
    assert.is_true(t.client_verified)
    assert.equal("CN=client,O=Shop", t.client_subject)
    local out, code = curl(with_client("stranger") .. srv.base .. "/tls")
    assert.are_not.equal(0, code, out)
  end)
end)

describe("HTTPS configuration", function()
  local app
  setup(function() app = app_copy() end)
  teardown(function() os.execute("rm -rf " .. app) end)

  --- `wxd run` that should fail at once: returns its output and exit code.
  local function run_fails(env)
    return H.sh(string.format("%s timeout 10 %s run %s --listen 127.0.0.1:%d --https-listen 127.0.0.1:%d",
      env, H.WXD, app, H.free_port(), H.free_port()))
  end

  it("refuses to start with a missing, bad or mismatched certificate or key, naming the file", function()
    for _, case in ipairs {
      { "WXD_TEST_CERT=certs/nope.pem", "cannot read certificate file " .. app .. "/certs/nope.pem: No such file" },
      { "WXD_TEST_KEY=/nonexistent/k.pem", "cannot read key file /nonexistent/k.pem: No such file" },
      { "WXD_TEST_CERT=certs/garbage.pem", "certificate file " .. app .. "/certs/garbage.pem holds no PEM certificate" },
      { "WXD_TEST_KEY=certs/garbage.pem", "key file " .. app .. "/certs/garbage.pem holds no PEM private key" },
      { "WXD_TEST_KEY=certs/client.key", "the key in " .. app .. "/certs/client.key does not match the certificate in "
        .. app .. "/certs/server.pem" },
      { "WXD_TEST_CERT=certs/rsa.pem WXD_TEST_KEY=certs/rsa-enc.key",
        "key file " .. app .. "/certs/rsa-enc.key is encrypted and no passphrase was given" },
      { "WXD_TEST_CERT=certs/rsa.pem WXD_TEST_KEY=certs/rsa-enc.key WXD_TEST_KEY_PASS=wrong-pass-123",
        "key file " .. app .. "/certs/rsa-enc.key: wrong passphrase" },
      { "WXD_TEST_CLIENT_VERIFY=require WXD_TEST_CLIENT_CA=certs/none.pem",
        "cannot read client CA file " .. app .. "/certs/none.pem" },
      { "WXD_TEST_CLIENT_VERIFY=require WXD_TEST_CLIENT_CA=certs/garbage.pem",
        "client CA file " .. app .. "/certs/garbage.pem holds no PEM certificate" },
    } do
      local out, code = run_fails(case[1])
      assert.equal(1, code, case[1] .. ": " .. out)
      assert.truthy(out:find("https: " .. case[2], 1, true), case[1] .. ": " .. out)
      assert.is_nil(out:find("wrong-pass-123", 1, true), "the passphrase is never printed")
      assert.is_nil(out:find("PRIVATE KEY", 1, true), "key material is never printed")
      assert.is_nil(out:find("Sanitizer", 1, true) or out:find("runtime error:", 1, true), out)
      -- wxd check finds the same.
      out, code = H.sh(case[1] .. " " .. H.WXD .. " check " .. app)
      assert.equal(1, code, out)
      assert.truthy(out:find("https: " .. case[2], 1, true), out)
    end
  end)

  it("reads an encrypted key with its passphrase from the environment, and an RSA chain", function()
    local srv = start(app, { env = "WXD_TEST_CERT=certs/rsa.pem WXD_TEST_KEY=certs/rsa-enc.key WXD_TEST_KEY_PASS=s3cret-pass" })
    finally(function() srv:stop() srv:cleanup() end)
    local r = cjson.decode((curl("--cacert " .. certs .. "/ca.pem --tls-max 1.2 " .. srv.base .. "/tls")))
    assert.truthy(r.tls.cipher:find("^ECDHE%-RSA%-"), r.tls.cipher)
    assert.is_false(r.passphrase_visible, "wxd.config.https.key_passphrase is removed")
  end)

  it("--https-listen needs an https section", function()
    local plain = H.tmpdir()
    finally(function() os.execute("rm -rf " .. plain) end)
    H.write_file(plain .. "/app.lua", 'return require("wxd.app").new()')
    local out, code = H.sh(H.WXD .. " run " .. plain .. " --https-listen 127.0.0.1:1")
    assert.equal(2, code, out)
    assert.truthy(out:find("--https-listen needs an https section", 1, true), out)
    out, code = H.sh(H.WXD .. " run " .. app .. " --https-listen nope")
    assert.equal(2, code, out)
    assert.truthy(out:find("--https-listen: expected HOST:PORT", 1, true), out)
  end)

  it("a reload swaps the certificate in every worker", function()
    local srv = start(app, { workers = 2, pid = true })
    finally(function()
      srv:stop() srv:cleanup()
      os.execute(string.format("cp %s/server.pem %s/server.key %s/certs/", certs, certs, app))
    end)
    os.execute(string.format("cp %s/server2.pem %s/certs/server.pem && cp %s/server2.key %s/certs/server.key",
      certs, app, certs, app))
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    local want = cert_field(certs .. "/server2.pem", "serial")
    for _ = 1, 8 do -- SO_REUSEPORT spreads these over both workers
      assert.equal(want, server_cert(srv.https_port):match("serial=(%x+)"))
    end
  end)

  it("min_version = 1.3 refuses TLS 1.2", function()
    local srv = start(app, { env = "WXD_TEST_MIN_TLS=1.3" })
    finally(function() srv:stop() srv:cleanup() end)
    assert.is_false((handshake_ok(srv.https_port, "-tls1_2")))
    assert.truthy(handshake_ok(srv.https_port, "-tls1_3"))
  end)

  it("listen = false serves HTTPS only", function()
    H.write_file(app .. "/config.lua", 'return { listen = false, https = { listen = "127.0.0.1:1", '
      .. 'cert = "certs/server.pem", key = "certs/server.key" } }')
    local hport = H.free_port()
    local log = app .. "/only.log"
    os.execute(string.format("%s run %s --https-listen 127.0.0.1:%d >%s 2>&1 & echo $! >%s.pid",
      H.WXD, app, hport, log, log))
    local pid = tonumber(H.read_file(log .. ".pid"):match("%d+"))
    finally(function()
      os.execute("kill " .. pid .. " 2>/dev/null")
      H.wait_until(function() return (H.read_file(log) or ""):find('"stopped"', 1, true) end, 10, "wxd to stop")
      local text = H.read_file(log)
      assert.is_nil(text:find("ERROR: AddressSanitizer", 1, true) or text:find("runtime error:", 1, true), text)
    end)
    H.wait_until(function() return (H.read_file(log) or ""):find('"listening"', 1, true) end, 10, "wxd to listen")
    local line = H.read_file(log):match('[^\n]*"listening"[^\n]*')
    assert.truthy(line:find('"https":"127.0.0.1:' .. hport .. '"', 1, true), line)
    assert.is_nil(line:find('"listen":', 1, true), line)
    assert.equal("hello world\n", curl("--cacert " .. certs .. "/ca.pem https://127.0.0.1:" .. hport .. "/hello"))
  end)

  it("validates the https section, naming the key", function()
    local config = require "wxd.config"
    local function errs(t, envs)
      local _, err = config.validate(t, { getenv = function(n) return envs and envs[n] end })
      return err or ""
    end
    local base = { listen = "127.0.0.1:8443", cert = "c.pem", key = "k.pem" }
    local function with(extra)
      local t = {}
      for k, v in pairs(base) do t[k] = v end
      for k, v in pairs(extra) do t[k] = v end
      return { https = t }
    end
    local cfg = assert(config.validate(with {}))
    assert.same({ listen = "127.0.0.1:8443", cert = "c.pem", key = "k.pem", client_verify = "off", min_version = "1.2" },
      cfg.https)
    assert.equal("require", assert(config.validate(with { client_ca = "ca.pem" })).https.client_verify)
    assert.equal("1.3", assert(config.validate(with { min_version = 1.3 })).https.min_version)
    assert.truthy(errs({ https = {} }):find("config.https.cert: required", 1, true))
    assert.truthy(errs({ https = {} }):find("config.https.listen: required", 1, true))
    assert.truthy(errs(with { listen = "nope" }):find("config.https.listen: expected", 1, true))
    assert.truthy(errs(with { client_verify = "maybe", client_ca = "x" }):find(
      'config.https.client_verify: expected "off", "optional" or "require"', 1, true))
    assert.truthy(errs(with { client_verify = "require" }):find(
      'config.https.client_ca: required when client_verify is "require"', 1, true))
    assert.truthy(errs(with { client_verify = "off", client_ca = "ca.pem" }):find("config.https.client_verify:", 1, true))
    assert.truthy(errs(with { min_version = "1.1" }):find('config.https.min_version: expected "1.2" or "1.3"', 1, true))
    assert.truthy(errs(with { ciphers = "x" }):find("config.https.ciphers: unknown key", 1, true))
    assert.truthy(errs(with { cret = "x" }):find('did you mean "cert"', 1, true))
    -- A passphrase is a secret: from the environment only.
    assert.truthy(errs(with { key_passphrase = "hunter2" }):find(
      'config.https.key_passphrase: secrets must come from the environment; use env("WXD_HTTPS_KEY_PASSPHRASE")', 1, true))
    assert.equal("pw", assert(config.validate(with { key_passphrase = config.env("P") },
      { getenv = function() return "pw" end })).https.key_passphrase)
    assert.truthy(errs({ listen = false }):find("config.listen: false turns plain HTTP off", 1, true))
    assert.truthy(errs({ https = "yes" }):find("config.https: expected a table", 1, true))
  end)
end)
