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
