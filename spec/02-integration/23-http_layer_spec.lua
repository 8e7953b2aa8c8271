-- The HTTP layer over real sockets: cookies on the wire (repeated
-- Set-Cookie lines), query arrays, route groups and error handlers.
local H = require "helpers"
local cjson = require "cjson"

-- Every value of one header, in order, from a raw response head.
local function header_lines(raw_head, name)
  local out = {}
  for n, v in raw_head:gmatch("\r\n([^:\r\n]+): ?([^\r\n]*)") do
    if n:lower() == name then out[#out + 1] = v end
  end
  return out
end

local B = "----wxdSpecBoundary7MA4YWxk"

-- A multipart/form-data body; parts are { name, data, filename? }.
local function multipart_body(parts, close)
  local out = {}
  for _, p in ipairs(parts) do
    local cd = 'Content-Disposition: form-data; name="' .. p[1] .. '"'
    if p[3] then cd = cd .. '; filename="' .. p[3] .. '"\r\nContent-Type: application/octet-stream' end
    out[#out + 1] = "--" .. B .. "\r\n" .. cd .. "\r\n\r\n" .. p[2] .. "\r\n"
  end
  if close ~= false then out[#out + 1] = "--" .. B .. "--\r\n" end
  return table.concat(out)
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

describe("http layer", function()
  local srv
  setup(function() srv = H.start(H.app("httpx")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  describe("cookies", function()
    it("reads the Cookie header", function()
      local r = srv:get("/cookies", { Cookie = 'sid=abc; theme="dark"; sid=second' })
      assert.same({ sid = "abc", theme = "dark" }, cjson.decode(r.body))
    end)

    it("sends one Set-Cookie line per cookie", function()
      local r = srv:request("POST", "/login", nil, "")
      assert.equal(200, r.status)
      assert.same({
        "sid=s1; Path=/; Max-Age=60; HttpOnly; SameSite=Lax",
        "theme=dark; Path=/; SameSite=Lax",
        "old=; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Lax",
      }, header_lines(r.raw_headers, "set-cookie"))
    end)
  end)

  it("collects a[] and repeated query keys", function()
    local r = srv:get("/tags?tag[]=a&tag%5B%5D=b&tag=c&id=7")
    assert.same({ tags = { "a", "b", "c" }, id = "7" }, cjson.decode(r.body))
  end)

  describe("multipart/form-data", function()
    local function upload(body, ct)
      return srv:request("POST", "/upload", { ["Content-Type"] = ct or ("multipart/form-data; boundary=" .. B) }, body)
    end

    it("gives fields, small files in memory and big ones on disk, removed after the response", function()
      local big = string.rep("abcdefghij", 2000) -- 20000 bytes, over the route's 1000-byte threshold
      local r = upload(multipart_body({ { "title", "hi there" }, { "small", "tiny", "s.txt" },
                                        { "big", big, "big.bin" } }))
      assert.equal(200, r.status, r.body)
      local got = cjson.decode(r.body)
      assert.same({ title = "hi there" }, got.fields)
      assert.equal(3, got.nparts)
      assert.equal("tiny", got.files.small.content)
      assert.is_false(got.files.small.path)
      assert.equal("big.bin", got.files.big.filename)
      assert.equal(20000, got.files.big.size)
      assert.is_true(got.files.big.content == big)
      assert.equal("string", type(got.files.big.path))
      -- The handler has returned: its temp file is gone.
      assert.is_false(exists(got.files.big.path))
    end)

    it("answers 413 over a part, part-count or body limit", function()
      local r = upload(multipart_body({ { "f", string.rep("x", 30001), "f.bin" } }))
      assert.equal(413, r.status)
      assert.same({ error = "too large" }, cjson.decode(r.body))
      local parts = {}
      for i = 1, 7 do parts[i] = { "p" .. i, "v" } end
      assert.equal(413, upload(multipart_body(parts)).status)
      -- Over the server's max_body_bytes (64 KiB): the core refuses it before the handler runs.
      r = upload(multipart_body({ { "f", string.rep("x", 70000), "f.bin" } }))
      assert.equal(413, r.status)
      assert.equal("request body too large\n", r.body)
    end)

    it("answers 400 to malformed bodies and 415 to other types", function()
      assert.equal(400, upload(multipart_body({ { "a", "1" } }, false)).status)
      assert.equal(400, upload("--" .. B .. "\r\nno headers here\r\n--" .. B .. "--").status)
      assert.equal(400, upload("not multipart at all").status)
      assert.equal(415, upload("a=1", "application/x-www-form-urlencoded").status)
    end)
  end)

  describe("streams with a Content-Length set by the app", function()
    it("sends identity coding and keeps the connection", function()
      local out = srv:raw("GET /sized/ok HTTP/1.1\r\nHost: x\r\n\r\nGET /sized/ok HTTP/1.1\r\nHost: x\r\n"
        .. "Connection: close\r\n\r\n")
      local rs = H.parse_responses(out)
      assert.equal(2, #rs)
      for _, r in ipairs(rs) do
        assert.equal("abcdef", r.body)
        assert.equal("6", r.headers["content-length"])
        assert.is_nil(r.headers["transfer-encoding"])
      end
    end)

    it("cuts the connection when the body is shorter or longer than promised", function()
      for _, case in ipairs({ "short", "over" }) do
        local out, closed = srv:raw("GET /sized/" .. case .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.is_true(closed, case)
        local head, rest = out:match("^(.-\r\n\r\n)(.*)$")
        assert.truthy(head:find("Content-Length: ", 1, true), case)
        assert.is_true(#rest < tonumber(head:match("Content%-Length: (%d+)")), case)
      end
    end)

    it("refuses an invalid Content-Length with a 500; a whole response ignores it", function()
      assert.equal(500, srv:get("/sized/bad").status)
      local r = srv:get("/sized/whole")
      assert.equal(200, r.status)
      assert.equal("5", r.headers["content-length"])
      assert.equal("hello", r.body)
    end)
  end)

  it("answers a CORS preflight with 204 and marks the actual response", function()
    local r, raw = srv:request("OPTIONS", "/pub/items", { Origin = "https://shop.example.com",
      ["Access-Control-Request-Method"] = "POST", ["Access-Control-Request-Headers"] = "content-type" })
    assert.equal(204, r.status)
    assert.equal("https://shop.example.com", r.headers["access-control-allow-origin"])
    assert.equal("true", r.headers["access-control-allow-credentials"])
    assert.truthy(r.headers["access-control-allow-methods"]:find("POST", 1, true))
    assert.equal("Origin", r.headers["vary"])
    assert.is_nil(r.headers["content-length"])
    assert.truthy(raw:match("\r\n\r\n$"))
    r = srv:request("POST", "/pub/items", { Origin = "https://shop.example.com" }, "")
    assert.equal(200, r.status)
    assert.equal("https://shop.example.com", r.headers["access-control-allow-origin"])
    assert.equal("X-Total", r.headers["access-control-expose-headers"])
    r = srv:request("OPTIONS", "/pub/items", { Origin = "https://evil.example", ["Access-Control-Request-Method"] = "POST" })
    assert.equal(403, r.status)
    assert.is_nil(r.headers["access-control-allow-origin"])
  end)

  describe("per-route body limits", function()
    local function chunked(path, n)
      local body = string.rep("c", n)
      local out = srv:raw("POST " .. path .. " HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        .. "Connection: close\r\n\r\n" .. string.format("%x", n) .. "\r\n" .. body .. "\r\n0\r\n\r\n")
      return H.parse_responses(out)[1]
    end

    it("a larger limit lets a route take more than max_body_bytes, by length or chunked", function()
      local r = srv:request("POST", "/limits/big", nil, string.rep("b", 90000))
      assert.equal(200, r.status)
      assert.same({ size = 90000 }, cjson.decode(r.body))
      assert.same({ size = 90000 }, cjson.decode(chunked("/limits/big", 90000).body))
      assert.equal(413, srv:request("POST", "/limits/big", nil, string.rep("b", 102401)).status)
      assert.equal(413, chunked("/limits/big", 102401).status)
      r = srv:request("PUT", "/limits/g/7", nil, string.rep("p", 80000))
      assert.same({ size = 80000, id = "7" }, cjson.decode(r.body))
      -- Other routes keep the global limit.
      assert.equal(413, srv:request("POST", "/limits/default", nil, string.rep("d", 70000)).status)
      assert.equal(413, srv:request("POST", "/nowhere", nil, string.rep("d", 70000)).status)
      assert.equal(200, srv:request("POST", "/limits/default", nil, string.rep("d", 60000)).status)
    end)

    it("a smaller limit is enforced before the body is read (no 100 Continue)", function()
      assert.same({ size = 100 }, cjson.decode(srv:request("POST", "/limits/small", nil, string.rep("s", 100)).body))
      assert.equal(413, srv:request("POST", "/limits/small", nil, string.rep("s", 101)).status)
      assert.equal(413, chunked("/limits/small", 101).status)
      local c = srv:connect()
      c:send("POST /limits/small HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
      local out = H.read_all(c, 5)
      c:close()
      assert.is_nil(out:find("100 Continue", 1, true))
      assert.equal(413, H.parse_responses(out)[1].status)
    end)
  end)

  describe("groups and error handlers", function()
    it("a group's middleware and 404 apply under its prefix; the app's 404 elsewhere", function()
      local r = srv:get("/api/v3/ok")
      assert.equal("v3", r.headers["x-generation"])
      r = srv:get("/api/v3/missing")
      assert.equal(404, r.status)
      assert.equal("v3", r.headers["x-generation"])
      assert.same({ type = "about:blank", title = "not found" }, cjson.decode(r.body))
      r = srv:get("/missing")
      assert.equal(404, r.status)
      assert.is_nil(r.headers["x-generation"])
      assert.same({ error = "no page here", path = "/missing" }, cjson.decode(r.body))
    end)

    it("a 500 handler answers with its own format and never the error; the log has it", function()
      local r = srv:get("/api/v3/boom")
      assert.equal(500, r.status)
      assert.equal("application/problem+json", r.headers["content-type"])
      local body = cjson.decode(r.body)
      assert.equal("internal error", body.title)
      assert.equal(18, #body.id)
      assert.is_nil(r.body:find("hunter2", 1, true))
      H.wait_until(function() return #srv:log_lines("hunter2") > 0 end, 5, "the error in the log")
      local line = srv:log_lines("hunter2")[1]
      assert.truthy(line:find(body.id, 1, true), line)
      assert.truthy(line:find("stack traceback", 1, true), line)
    end)

    it("without a 500 handler the core's generic 500 stays", function()
      local r = srv:get("/boom")
      assert.equal(500, r.status)
      assert.truthy(r.body:match("^internal server error %(request id %x+%)\n$"), r.body)
    end)
  end)
end)
