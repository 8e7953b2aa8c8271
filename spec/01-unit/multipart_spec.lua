-- wxd.multipart: parsing multipart/form-data bodies, limits, temp files,
-- and their removal by wxd.app once the request ends.
local multipart = require "wxd.multipart"
local wxd_app = require "wxd.app"

local B = "XyZ-boundary"
local CT = "multipart/form-data; boundary=" .. B

-- parts: { name, data, filename?, content_type? } or a raw string part.
local function body(parts, opts)
  opts = opts or {}
  local out = { opts.preamble or "" }
  for _, p in ipairs(parts) do
    out[#out + 1] = "--" .. B .. "\r\n"
    if type(p) == "string" then
      out[#out + 1] = p
    else
      local cd = 'Content-Disposition: form-data; name="' .. p[1] .. '"'
      if p[3] then cd = cd .. '; filename="' .. p[3] .. '"' end
      out[#out + 1] = cd .. "\r\n"
      if p[4] then out[#out + 1] = "Content-Type: " .. p[4] .. "\r\n" end
      out[#out + 1] = "\r\n" .. p[2]
    end
    out[#out + 1] = "\r\n"
  end
  out[#out + 1] = "--" .. B .. "--\r\n" .. (opts.epilogue or "")
  return table.concat(out)
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

describe("wxd.multipart", function()
  it("reads the boundary of a multipart/form-data Content-Type only", function()
    assert.equal("abc", multipart.boundary("multipart/form-data; boundary=abc"))
    assert.equal("a b:c", multipart.boundary('Multipart/Form-Data ; charset=utf-8; BOUNDARY="a b:c"'))
    assert.equal("AaB", multipart.boundary("multipart/form-data;boundary=AaB;x=y"))
    assert.is_nil(multipart.boundary("multipart/mixed; boundary=abc"))
    assert.is_nil(multipart.boundary("multipart/form-data"))
    assert.is_nil(multipart.boundary("multipart/form-data; boundary="))
    assert.is_nil(multipart.boundary("multipart/form-data; boundary=" .. string.rep("a", 71)))
    assert.is_nil(multipart.boundary(nil))
  end)

  it("parses fields and files, with preamble and epilogue, in order", function()
    local b = body({ { "title", "hello" }, { "tag", "a" }, { "tag", "b" },
                     { "avatar", "\0PNG\r\n--not-a-boundary", "C:\\Users\\me\\a.png", "image/png" },
                     { "empty", "" } }, { preamble = "ignored preamble\r\n", epilogue = "ignored" })
    local form = assert(multipart.parse(b, B))
    assert.same({ title = "hello", tag = "b", empty = "" }, form.fields)
    local f = form.files.avatar
    assert.equal("a.png", f.filename)
    assert.equal("image/png", f.content_type)
    assert.equal("\0PNG\r\n--not-a-boundary", f.data)
    assert.equal(#f.data, f.size)
    assert.equal(5, #form.parts)
    assert.equal("tag", form.parts[2].name)
    assert.equal("a", form.parts[2].data)
    assert.equal("text/plain", form.parts[1].content_type)
  end)

  it("reads quoted names with escapes, token names, and file names without directories", function()
    local b = body({ 'Content-Disposition: form-data; name=plain\r\n\r\n1',
                     'Content-Disposition: form-data; name="a \\"q\\" b"; filename="../../etc/passwd"\r\n\r\nx',
                     'content-disposition: FORM-DATA; NAME="n"; filename=""\r\n\r\ny' })
    local form = assert(multipart.parse(b, B))
    assert.equal("1", form.fields.plain)
    assert.equal("passwd", form.files['a "q" b'].filename)
    assert.equal("", form.files.n.filename)
  end)

  it("refuses malformed bodies with 400", function()
    local cases = {
      "", "garbage", "--" .. B, "--" .. B .. "\r\n",
      body({ { "a", "1" } }):gsub("%-%-\r\n$", "\r\n"),                   -- no closing delimiter
      "--" .. B .. "\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue", -- cut short
      body({ "Content-Type: text/plain\r\n\r\nno disposition" }),
      body({ "Content-Disposition: attachment; name=\"a\"\r\n\r\nx" }),
      body({ "Content-Disposition: form-data; filename=\"f\"\r\n\r\nno name" }),
      body({ "Content-Disposition: form-data; name=\"unterminated\r\n\r\nx" }),
      body({ "Content-Disposition form-data\r\n\r\nx" }),
      "--" .. B .. "junk\r\n",
      -- A header block that runs into the next part's delimiter.
      "--" .. B .. "\r\nContent-Disposition: form-data; name=\"a\"\r\n--" .. B
        .. "\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\nx\r\n--" .. B .. "--",
    }
    for i, c in ipairs(cases) do
      local form, err, status = multipart.parse(c, B)
      assert.is_nil(form, i)
      assert.equal("malformed", err, i)
      assert.equal(400, status, i)
    end
  end)

  it("refuses what goes over each limit with 413", function()
    local function over(parts, opts)
      local form, err, status = multipart.parse(body(parts), B, opts)
      assert.is_nil(form)
      assert.equal("too large", err)
      assert.equal(413, status)
    end
    over({ { "a", "1" }, { "b", "2" }, { "c", "3" } }, { max_parts = 2 })
    over({ { "f", "x", "1" }, { "g", "y", "2" } }, { max_files = 1 })
    over({ { "f", string.rep("x", 11), "f.bin" } }, { max_part_bytes = 10 })
    over({ { "field", string.rep("x", 11) } }, { max_field_bytes = 10 })
    over({ { "a", string.rep("x", 6) }, { "b", string.rep("x", 6) } }, { max_total_bytes = 10 })
    over({ 'Content-Disposition: form-data; name="a"\r\nX-Pad: ' .. string.rep("p", 100) .. "\r\n\r\nx" },
      { max_header_bytes = 50 })
    -- Exactly at each limit is fine.
    assert.truthy(multipart.parse(body({ { "f", string.rep("x", 10), "f.bin" } }), B, { max_part_bytes = 10 }))
    assert.has_error(function() multipart.parse(body({}), B, { max_partz = 1 }) end)
  end)

  it("writes file parts above the threshold to temp files, and removes them on failure", function()
    local big = string.rep("0123456789", 300)
    local tmp = {}
    local form = assert(multipart.parse(body({ { "big", big, "big.bin" }, { "small", "s", "s.txt" } }), B,
      { file_threshold = 1000 }, tmp))
    local path = form.files.big.path
    assert.is_nil(form.files.big.data)
    assert.equal(1, #tmp)
    local f = assert(io.open(path, "rb"))
    assert.equal(big, f:read("*a"))
    f:close()
    assert.equal("s", form.files.small.data)
    multipart.remove_files(tmp)
    assert.is_false(exists(path))
    -- A later part over a limit: the files already written are removed.
    local tmp2 = {}
    local none = multipart.parse(body({ { "big", big, "big.bin" }, { "x", "1" }, { "y", "2" } }), B,
      { file_threshold = 1000, max_parts = 2 }, tmp2)
    assert.is_nil(none)
    assert.equal(1, #tmp2)
    assert.is_false(tmp2[1]) -- removed and marked
  end)
end)

describe("req:multipart", function()
  local function raw(b, ct)
    return { method = "POST", path = "/up", query = "", version = "1.1", id = "r",
             headers = { ["content-type"] = ct or CT }, body = b, remote_addr = "127.0.0.1", remote_port = 1 }
  end

  it("gives 415 for another content type and caches the parse", function()
    local app = wxd_app.new()
    app:post("/up", function(req)
      local form, err, status = req:multipart()
      if not form then return status, { error = err } end
      assert.equal(form, req:multipart())
      return form.fields
    end)
    local status, _, b = app:handle(raw("a=1", "application/x-www-form-urlencoded"))
    assert.equal(415, status)
    assert.equal('{"error":"not multipart"}', b)
    status, _, b = app:handle(raw(body({ { "a", "1" } })))
    assert.equal(200, status)
    assert.equal('{"a":"1"}', b)
  end)

  it("removes temp files when the request ends, and after an error once the request is collected", function()
    local app = wxd_app.new()
    local path
    app:post("/up", function(req)
      local form = assert(req:multipart({ file_threshold = 10 }))
      path = form.files.f.path
      assert.is_true(exists(path))
      if req.query.fail then error("after the upload") end
      return "ok"
    end)
    assert.equal(200, (app:handle(raw(body({ { "f", string.rep("x", 100), "f.bin" } })))))
    assert.is_false(exists(path))
    local r = raw(body({ { "f", string.rep("x", 100), "f.bin" } }))
    r.query = "fail=1"
    assert.is_false(pcall(app.handle, app, r))
    assert.is_true(exists(path)) -- still referenced by r
    r = nil -- luacheck: ignore 311
    collectgarbage("collect")
    collectgarbage("collect")
    assert.is_false(exists(path))
  end)
end)
