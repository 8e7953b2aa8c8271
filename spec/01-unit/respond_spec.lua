-- Unit specs for wxd.respond: the v2 envelope, v3 problem details and
-- RFC 8288 Link pagination, through app:handle.
local wxd_app = require "wxd.app"
local respond = require "wxd.respond"
local json = require "wxd.json"

local function call(app, method, path, qs)
  local status, hdrs, body = app:handle({ method = method, path = path, query = qs or "", version = "1.1",
    headers = {}, body = "", remote_addr = "127.0.0.1", remote_port = 1, id = "rid" })
  local h = {}
  for k, v in pairs(hdrs or {}) do h[k:lower()] = v end
  return status, h, json.decode(body)
end

describe("wxd.respond", function()
  it("envelopes v2 answers with integer codes, the status from the code", function()
    local s, b = respond.envelope.ok({ id = 1 })
    assert.equal(200, s)
    assert.same({ code = 0, message = "ok", data = { id = 1 } }, b)
    assert.same({ 400, { code = 4001, message = "bad id", data = json.null } }, { respond.envelope.err(4001, "bad id") })
    assert.equal(404, (respond.envelope.err(40401, "x")))
    assert.equal(200, (respond.envelope.err(4001, "x", 200)))
    assert.has_error(function() respond.envelope.err("4001") end)
    local app = wxd_app.new()
    app:group("/v2", function(g)
      respond.envelope.on_error(g)
      g:get("/boom", function() error("boom") end)
      g:post("/x", function() return "x" end)
    end)
    local st, _, body = call(app, "GET", "/v2/nope")
    assert.same({ 404, 4040 }, { st, body.code })
    st, _, body = call(app, "GET", "/v2/x")
    assert.same({ 405, 4050 }, { st, body.code })
    st, _, body = call(app, "GET", "/v2/boom")
    assert.same({ 500, 5000 }, { st, body.code })
    assert.equal("internal error (request id rid)", body.message)
  end)

  it("answers v3 errors as problem details", function()
    local app = wxd_app.new()
    app:group("/v3", function(g)
      respond.problem.on_error(g)
      g:get("/orders/:id", function(req, res)
        return respond.problem.new(res, 404,
          { detail = "no order " .. req.params.id, type = "https://example.com/probs/no-order" })
      end)
    end)
    local st, h, body = call(app, "GET", "/v3/orders/9")
    assert.equal(404, st)
    assert.equal("application/problem+json", h["content-type"])
    assert.same({ type = "https://example.com/probs/no-order", title = "Not Found", status = 404, detail = "no order 9" }, body)
    local _, h4, body4 = call(app, "GET", "/v3/other")
    assert.equal("application/problem+json", h4["content-type"])
    assert.same({ type = "about:blank", title = "Not Found", status = 404, instance = "/v3/other" }, body4)
  end)

  it("sets Link pagination keeping other query parameters", function()
    local app = wxd_app.new()
    app:get("/items", function(req, res)
      local page, per = respond.page_of(req, 10, 50)
      if not page then return respond.problem.new(res, 400, { detail = per }) end
      respond.paginate(req, res, page, per, 95)
      return { page = page, per = per }
    end)
    local st, h, body = call(app, "GET", "/items", "status=open&page=2&per_page=20")
    assert.equal(200, st)
    assert.same({ page = 2, per = 20 }, body)
    assert.equal('</items?status=open&page=1&per_page=20>; rel="first", </items?status=open&page=1&per_page=20>; rel="prev", '
      .. '</items?status=open&page=3&per_page=20>; rel="next", </items?status=open&page=5&per_page=20>; rel="last"', h.link)
    assert.equal("95", h["x-total-count"])
    local _, h2 = call(app, "GET", "/items")
    assert.equal('</items?page=1&per_page=10>; rel="first", </items?page=2&per_page=10>; rel="next", '
      .. '</items?page=10&per_page=10>; rel="last"', h2.link)
    local _, h3 = call(app, "GET", "/items", "page=10")
    assert.falsy(h3.link:find('rel="next"', 1, true))
    assert.equal(400, (call(app, "GET", "/items", "page=0")))
    assert.equal(400, (call(app, "GET", "/items", "page=x")))
    assert.same({ page = 1, per = 50 }, select(3, call(app, "GET", "/items", "per_page=1000")))
  end)
end)
