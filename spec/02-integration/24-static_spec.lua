-- app:static over real sockets: conditional requests, ranges, large files
-- streamed with their length, index files, and traversal attempts sent as
-- raw bytes (no client normalises them on the way).
local H = require "helpers"
local wxd = require "wxd"

local SECRET = "TOP-SECRET-CONTENT"

local APP = [[
local wxd = require "wxd"
local app = require("wxd.app").new()
app:static("/files", wxd.app_dir .. "/public", { max_age = 60 })
app:group("/g", function(g) g:static("/assets", wxd.app_dir .. "/public", { index = false }) end)
return app
]]

-- Bytes 0..255 repeated: a range is easy to check.
local function pattern_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char((i - 1) % 251) end
  return table.concat(t)
end

local function raw_get(srv, target, extra)
  local out = srv:raw("GET " .. target .. " HTTP/1.1\r\nHost: x\r\n" .. (extra or "") .. "Connection: close\r\n\r\n")
  return H.parse_responses(out)[1], out
end

describe("static files", function()
  local srv, dir, big
  setup(function()
    dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", APP)
    H.sh("mkdir -p " .. dir .. "/public/sub " .. dir .. "/public/empty-dir " .. dir .. "/outside")
    H.write_file(dir .. "/secret.txt", SECRET)
    H.write_file(dir .. "/outside/secret.txt", SECRET)
    H.write_file(dir .. "/public/a.txt", "hello static\n")
    H.write_file(dir .. "/public/style.css", "body{}")
    H.write_file(dir .. "/public/empty.txt", "")
    H.write_file(dir .. "/public/.hidden", SECRET)
    H.write_file(dir .. "/public/sub/index.html", "<h1>index</h1>")
    H.write_file(dir .. "/public/noext", "x")
    big = pattern_bytes(300 * 1024 + 17)
    H.write_file(dir .. "/public/big.bin", big)
    H.sh("ln -s ../secret.txt " .. dir .. "/public/escape-link")
    H.sh("ln -s ../outside " .. dir .. "/public/escape-dir")
    H.sh("ln -s " .. dir .. "/secret.txt " .. dir .. "/public/abs-link")
    H.sh("ln -s a.txt " .. dir .. "/public/inside-link")
    srv = H.start(dir)
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    H.sh("rm -rf " .. dir)
  end)

  it("serves a file with type, length, validators and cache headers", function()
    local r = srv:get("/files/a.txt")
    assert.equal(200, r.status)
    assert.equal("hello static\n", r.body)
    assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
    assert.equal("13", r.headers["content-length"])
    assert.equal("public, max-age=60", r.headers["cache-control"])
    assert.equal("bytes", r.headers["accept-ranges"])
    assert.equal("nosniff", r.headers["x-content-type-options"])
    assert.truthy(r.headers["etag"]:match('^"%x+%-d"$'), r.headers["etag"])
    assert.truthy(r.headers["last-modified"]:match("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$"))
    assert.equal("text/css; charset=utf-8", srv:get("/files/style.css").headers["content-type"])
    assert.equal("application/octet-stream", srv:get("/files/noext").headers["content-type"])
    local e = srv:get("/files/empty.txt")
    assert.equal(200, e.status)
    assert.equal("", e.body)
    assert.equal("hello static\n", srv:get("/files/inside-link").body)
    assert.equal("hello static\n", srv:get("/g/assets/a.txt").body)
  end)

  it("answers 304 to a matching If-None-Match or a later If-Modified-Since", function()
    local r = srv:get("/files/a.txt")
    local etag, lm = r.headers["etag"], r.headers["last-modified"]
    local c = srv:get("/files/a.txt", { ["If-None-Match"] = etag })
    assert.equal(304, c.status)
    assert.equal("", c.body)
    assert.equal(etag, c.headers["etag"])
    assert.equal(304, srv:get("/files/a.txt", { ["If-None-Match"] = '"other", W/' .. etag }).status)
    assert.equal(304, srv:get("/files/a.txt", { ["If-None-Match"] = "*" }).status)
    assert.equal(200, srv:get("/files/a.txt", { ["If-None-Match"] = '"other"' }).status)
    assert.equal(304, srv:get("/files/a.txt", { ["If-Modified-Since"] = lm }).status)
    assert.equal(304, srv:get("/files/a.txt", { ["If-Modified-Since"] = "Fri, 01 Jan 2100 00:00:00 GMT" }).status)
    assert.equal(200, srv:get("/files/a.txt", { ["If-Modified-Since"] = "Thu, 01 Jan 1970 00:00:01 GMT" }).status)
    assert.equal(200, srv:get("/files/a.txt", { ["If-Modified-Since"] = "yesterday" }).status)
    -- If-None-Match wins over If-Modified-Since.
    assert.equal(200, srv:get("/files/a.txt", { ["If-None-Match"] = '"other"', ["If-Modified-Since"] = lm }).status)
  end)

  it("serves single byte ranges with 206, 416 when unsatisfiable, the whole file otherwise", function()
    local function range(v, extra)
      local h = extra or {}
      h.Range = v
      return srv:get("/files/a.txt", h)
    end
    local r = range("bytes=0-4")
    assert.equal(206, r.status)
    assert.equal("hello", r.body)
    assert.equal("bytes 0-4/13", r.headers["content-range"])
    r = range("bytes=6-")
    assert.equal("static\n", r.body)
    assert.equal("bytes 6-12/13", r.headers["content-range"])
    r = range("bytes=-7")
    assert.equal("static\n", r.body)
    r = range("bytes=10-100")
    assert.equal("ic\n", r.body)
    assert.equal("bytes 10-12/13", r.headers["content-range"])
    r = range("bytes=13-")
    assert.equal(416, r.status)
    assert.equal("bytes */13", r.headers["content-range"])
    assert.equal(416, range("bytes=-0").status)
    -- Ignored: several ranges, another unit, nonsense.
    for _, v in ipairs({ "bytes=0-1,3-4", "items=0-1", "bytes=5-1", "bytes=x-y", "bytes=-" }) do
      r = range(v)
      assert.equal(200, r.status, v)
      assert.equal("hello static\n", r.body, v)
    end
    local etag = r.headers["etag"]
    assert.equal(206, range("bytes=0-0", { ["If-Range"] = etag }).status)
    assert.equal(200, range("bytes=0-0", { ["If-Range"] = '"stale"' }).status)
    assert.equal(206, range("bytes=0-0", { ["If-Range"] = r.headers["last-modified"] }).status)
    assert.equal(200, range("bytes=0-0", { ["If-Range"] = "Thu, 01 Jan 1970 00:00:00 GMT" }).status)
  end)

  it("streams a large file with its Content-Length, keeps the connection, and serves large ranges", function()
    local c = srv:connect()
    c:send("GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /files/big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=100000-299999\r\n\r\n"
      .. "GET /files/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local out = H.read_all(c, 10)
    c:close()
    local rs = H.parse_responses(out)
    assert.equal(3, #rs)
    assert.equal(200, rs[1].status)
    assert.equal(tostring(#big), rs[1].headers["content-length"])
    assert.is_nil(rs[1].headers["transfer-encoding"])
    assert.equal("keep-alive", rs[1].headers["connection"])
    assert.equal("application/octet-stream", rs[1].headers["content-type"])
    assert.is_true(rs[1].body == big)
    assert.equal(206, rs[2].status)
    assert.equal("200000", rs[2].headers["content-length"])
    assert.equal("bytes 100000-299999/" .. #big, rs[2].headers["content-range"])
    assert.is_true(rs[2].body == big:sub(100001, 300000))
    assert.equal("hello static\n", rs[3].body)
  end)

  it("answers HEAD with the length and no body, small or large", function()
    for _, f in ipairs({ { "/files/a.txt", "13" }, { "/files/big.bin", tostring(#big) } }) do
      local r, raw = srv:request("HEAD", f[1])
      assert.equal(200, r.status)
      assert.equal(f[2], r.headers["content-length"])
      assert.truthy(raw:match("\r\n\r\n$"), f[1])
    end
  end)

  it("serves index.html for a directory, redirects without the slash, 404 without an index", function()
    local r = srv:get("/files/sub/")
    assert.equal(200, r.status)
    assert.equal("<h1>index</h1>", r.body)
    assert.equal("text/html; charset=utf-8", r.headers["content-type"])
    r = srv:get("/files/sub?x=1")
    assert.equal(301, r.status)
    assert.equal("/files/sub/?x=1", r.headers["location"])
    assert.equal(301, srv:get("/files").status)
    assert.equal(404, srv:get("/files/").status) -- public/ has no index.html
    assert.equal(404, srv:get("/files/empty-dir/").status)
    assert.equal(404, srv:get("/g/assets/sub/").status) -- index = false
    assert.equal(404, srv:get("/files/a.txt/").status)
    assert.equal(404, srv:get("/files/missing.txt").status)
    assert.equal(405, srv:request("POST", "/files/a.txt", nil, "x").status)
  end)

  it("refuses every traversal attempt and hidden file, never sending what lies outside", function()
    local nasty = {
      "/files/../secret.txt", "/files/..%2fsecret.txt", "/files/..%2Fsecret.txt", "/files/%2e%2e/secret.txt",
      "/files/%2E%2E/secret.txt", "/files/.%2e/secret.txt", "/files/%2e./secret.txt",
      "/files/sub/../../secret.txt", "/files/sub/%2e%2e/%2e%2e/secret.txt",
      "/files/..%5csecret.txt", "/files/%2e%2e%5csecret.txt", "/files/..%5Csecret.txt",
      "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/files/..%252fsecret.txt",
      "/files/a.txt%00.html", "/files/%00", "/files/a.txt%00", "/files//etc/passwd", "/files/sub//index.html",
      "/files/escape-link", "/files/escape-dir/secret.txt", "/files/abs-link", "/files/.hidden",
      "/files/./a.txt", "/files/sub/./index.html", "/files/..;/secret.txt", "/files/%c0%ae%c0%ae/secret.txt",
      "/files/%2e%2e", "/files/..", "/files/...", "/files/sub/..", "/g/assets/../../secret.txt",
      "/files/%2e%2e/outside/secret.txt", "/files/..\\secret.txt", "/files/\\..\\secret.txt",
    }
    for _, target in ipairs(nasty) do
      local r, out = raw_get(srv, target)
      assert.is_nil(out:find(SECRET, 1, true), target)
      assert.truthy(r.status == 404 or r.status == 400, target .. " got " .. r.status)
    end
    -- A NUL byte in the request line itself is refused by the parser.
    local out = srv:raw("GET /files/a.txt\0.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.equal(400, H.parse_responses(out)[1].status)
  end)
end)

describe("wxd.static helpers", function()
  local static = require "wxd.static"

  it("parses IMF-fixdate HTTP dates and nothing else", function()
    assert.equal(784111777, static.parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"))
    assert.equal(0, static.parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"))
    assert.equal(951782400, static.parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"))
    assert.is_nil(static.parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"))
    assert.is_nil(static.parse_http_date("Sun Nov  6 08:49:37 1994"))
    assert.is_nil(static.parse_http_date(nil))
    for _, t in ipairs({ 0, 86399, 951782400, 1796332652, 4102444800 }) do
      assert.equal(t, static.parse_http_date(os.date("!%a, %d %b %Y %H:%M:%S GMT", t)))
    end
  end)

  it("refuses bad options and a missing directory when the app loads", function()
    local app = require("wxd.app").new()
    assert.has_error(function() app:static("/x", "/nonexistent-dir-for-spec") end)
    assert.has_error(function() app:static("x", ".") end)
    assert.has_error(function() app:static("/x/", ".") end)
    assert.has_error(function() app:static("/x", ".", { indx = "a" }) end)
    assert.has_error(function() app:static("/x", ".", { index = "../a" }) end)
    assert.has_error(function() app:static("/x", ".", { max_age = -1 }) end)
    local ok, err = pcall(function() app:static("/y", "/nonexistent-dir-for-spec") end)
    assert.is_false(ok)
    assert.truthy(err:find("24%-static_spec.lua:%d+: wxd.static"), err)
  end)
end)

describe("static files sent by the core", function()
  local srv, dir, big
  local SIZE = 8 * 1024 * 1024 + 3 -- more than a socket buffer: sendfile meets EAGAIN

  setup(function()
    dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", APP)
    local out, code = H.sh(string.format([[
      set -e; cd %s; mkdir -p public
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out cert.pem \
        -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -days 2 2>/dev/null
    ]], dir))
    assert(code == 0, out)
    H.write_file(dir .. "/config.lua", string.format(
      'return { https = { listen = "127.0.0.1:8443", cert = %q, key = %q } }', dir .. "/cert.pem", dir .. "/key.pem"))
    local parts = {}
    for i = 1, 64 do parts[i] = pattern_bytes(128 * 1024):sub(i) .. string.rep(string.char(i), i - 1) end
    big = table.concat(parts) .. "end"
    assert(#big == SIZE, #big)
    H.write_file(dir .. "/public/big.bin", big)
    local hport = H.free_port()
    srv = H.start(dir, { args = "--https-listen 127.0.0.1:" .. hport })
    srv.https_port = hport
  end)
  teardown(function()
    srv:stop(); srv:cleanup()
    H.sh("rm -rf " .. dir)
  end)

  local function open_fds()
    local out = H.sh("ls /proc/" .. srv.pid .. "/fd | wc -l")
    return tonumber(out:match("%d+"))
  end

  it("sends a large file whole to a client that reads late, then serves the next request", function()
    local c = srv:connect(20)
    c:send("GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\nGET /files/big.bin HTTP/1.1\r\nHost: x\r\n"
      .. "Range: bytes=1000-2000999\r\nConnection: close\r\n\r\n")
    wxd.sleep(300) -- the socket buffers fill meanwhile
    local out = H.read_all(c, 20)
    c:close()
    local rs = H.parse_responses(out)
    assert.equal(2, #rs)
    assert.equal(tostring(SIZE), rs[1].headers["content-length"])
    assert.is_true(rs[1].body == big)
    assert.equal(206, rs[2].status)
    assert.is_true(rs[2].body == big:sub(1001, 2001000))
  end)

  it("sends a large file over HTTPS", function()
    local file = dir .. "/got.bin"
    local out, code = H.sh(string.format("curl -sk --http1.1 -o %s -w '%%{http_code} %%{size_download}' "
      .. "https://127.0.0.1:%d/files/big.bin", file, srv.https_port))
    assert.equal(0, code, out)
    assert.equal("200 " .. SIZE, out)
    assert.is_true(H.read_file(file) == big)
    out = H.sh(string.format("curl -sk --http1.1 -H 'Range: bytes=-100000' https://127.0.0.1:%d/files/big.bin | wc -c",
      srv.https_port))
    assert.equal("100000", out:match("%d+"))
  end)

  it("survives clients that leave mid-file, leaking no file descriptor", function()
    local before = open_fds()
    for _ = 1, 5 do
      local c = srv:connect()
      c:send("GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
      assert(c:receive(1000))
      c:close()
    end
    -- The server notices each close when it next writes; then all is freed.
    H.wait_until(function() return open_fds() <= before end, 10, "the file descriptors to be closed")
    local r = srv:get("/files/big.bin", { Range = "bytes=0-9" })
    assert.equal(206, r.status)
    assert.equal(big:sub(1, 10), r.body)
  end)
end)
