-- JSON answers: arrays stay arrays (empty ones too) however a handler builds
-- them, and a value with no JSON form is a 500 whose log line names it.
local H = require "helpers"
local json = require "wxd.json"

-- (spec/helpers.lua waits for the pid itself.)
local start = H.start

describe("JSON answers", function()
  local srv
  setup(function() srv = start(H.app("json"), { workers = 1 }) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local function expect(path, status, body)
    local r = srv:get(path)
    assert.equal(status, r.status, path .. ": " .. r.body)
    assert.equal(body, r.body, path)
    assert.equal("application/json", r.headers["content-type"], path)
  end

  it("answer [] for an empty json.array, a decoded [] and res:json", function()
    expect("/empty-array", 200, "[]")
    expect("/decoded", 200, "[]")
    expect("/res-json", 200, '{"items":[]}')
    expect("/status-array", 201, "[]")
    expect("/empty-object", 200, "{}")
  end)

  it("send back what req:json() read, arrays as arrays", function()
    for _, body in ipairs({ '{"a":[]}', "[]", "[[],{},[[]]]", '{"a":{"b":[1,null,"x"]}}', '["\195\169"]' }) do
      local r = srv:request("POST", "/echo", { ["Content-Type"] = "application/json" }, body)
      assert.equal(200, r.status, body)
      assert.equal(body, r.body)
    end
    local r = srv:request("POST", "/echo", nil, '{"a":')
    assert.equal(400, r.status)
    assert.same({ error = "invalid json", detail = "expected a value at byte 6 (found the end)" }, json.decode(r.body))
  end)

  it("answer 500 for a value with no JSON form, and log what and where", function()
    local cases = {
      ["/sparse"] = "wxd.json: cannot encode an excessively sparse array (largest index 1000, 2 items) at $.orders",
      ["/mixed"] = "wxd.json: cannot encode a table with both array items and string keys at $",
      ["/function"] = "wxd.json: cannot encode a function at $.cb",
      ["/nan"] = "wxd.json: cannot encode NaN or infinity at $.ratio",
    }
    for path, message in pairs(cases) do
      local r = srv:get(path)
      assert.equal(500, r.status, path)
      assert.truthy(r.body:find("internal server error", 1, true))
      H.wait_until(function()
        for line in srv:log_text():gmatch("[^\n]+") do
          local v = json.decode(line)
          if v and v.msg == "handler error" and v.path == path then
            assert.truthy(v.error:find(message, 1, true), v.error)
            return true
          end
        end
      end, 5, "the handler error line of " .. path)
    end
  end)
end)

describe("the README's shop example", function()
  local dir, srv
  local AUTH = { Authorization = "Bearer s3cret" }

  -- Runs the code of README.md itself, so the example cannot drift.
  setup(function()
    local readme = assert(H.read_file(H.ROOT .. "/README.md"))
    dir = H.tmpdir()
    os.execute("mkdir -p " .. dir .. "/shop/handlers " .. dir .. "/shop/lib")
    for _, name in ipairs({ "app.lua", "handlers/orders.lua", "lib/orders.lua", "config.lua" }) do
      local code = readme:match("`shop/" .. (name:gsub("%p", "%%%0")) .. "`[^\n]*\n\n```lua\n(.-\n)```")
      assert(code, "README.md has no block for shop/" .. name)
      H.write_file(dir .. "/shop/" .. name, code)
    end
    srv = start(dir .. "/shop", { workers = 1, env = "SHOP_TOKEN=s3cret" })
  end)
  teardown(function()
    if srv then srv:stop(); srv:cleanup() end
    os.execute("rm -rf " .. dir)
  end)

  it("lists no orders as [] and one order as a list of one", function()
    local r = srv:get("/api/orders", AUTH)
    assert.equal(200, r.status)
    assert.equal("[]", r.body)
    r = srv:request("POST", "/api/orders", AUTH, '{"amount": 990}')
    assert.equal(201, r.status)
    assert.equal("/api/orders/1", r.headers["location"])
    local list = json.decode(srv:get("/api/orders?status=new", AUTH).body)
    assert.same({ id = "1", amount = 990, status = "new" }, list[1])
    assert.equal(1, #list)
    assert.equal("[]", srv:get("/api/orders?status=paid", AUTH).body)
  end)
end)
