-- The live order page of examples/pay in a real browser: Debian's chromium,
-- headless, driven by puppeteer-core (both installed by make deps). The page
-- shows an order's state; a transition made afterwards (the way a payment
-- notification makes it) reaches it over its WebSocket (wxd.order publishes
-- each change to the topic order/<out_trade_no>, see docs/order.md) and
-- the page shows the new state without a reload.
local H = require "helpers"

local NODE_MODULES = H.ROOT .. "/build/spec/node/node_modules"
local DRIVER = H.ROOT .. "/spec/fixtures/live_page_browser.js"

local function have_browser()
  return H.read_file(NODE_MODULES .. "/puppeteer-core/package.json") ~= nil
    and os.execute("command -v chromium >/dev/null 2>&1") == 0
end

describe("the live order page in headless chromium", function()
  if not have_browser() then
    pending("chromium or npm puppeteer-core missing (run make deps)")
    return
  end

  local srv, dir
  setup(function()
    dir = H.tmpdir()
    assert(os.execute(string.format("cp -r %s/. %s/", H.app("livepage"), dir)) == 0)
    srv = H.start(dir, { workers = 2, env = "LIVE_EXAMPLE_DIR=" .. H.ROOT .. "/examples/pay" })
  end)
  teardown(function()
    if srv then srv:stop() srv:cleanup() end
    os.execute("rm -rf " .. dir)
  end)

  it("shows the order, then its payment as it happens", function()
    local no = "LIVE" .. os.time() .. math.random(1000, 9999)
    local r = srv:request("POST", "/t/orders/" .. no, nil, "")
    assert.equal(200, r.status, r.body)
    local out = dir .. "/browser.out"
    local shot = dir .. "/page.png"
    os.execute(string.format("(NODE_PATH=%s node %s http://127.0.0.1:%d %s %s >%s 2>&1; echo \"exit $?\" >>%s)"
      .. " >/dev/null 2>&1 &", NODE_MODULES, DRIVER, srv.port, no, shot, out, out))
    H.wait_until(function() return (H.read_file(out) or ""):find("exit %d") end, 120, "the browser to finish")
    local text = H.read_file(out)
    assert.matches("state PAYING\nstate PAID\n", text, 1, true)
    assert.matches("link live", text, 1, true)
    -- The DOM as the browser shows it: the order, its state, the history
    -- with the transition the page saw happen.
    local dom = text:match("dom ([^\n]*)")
    assert.is_string(dom, text)
    assert.matches("Order " .. no, dom, 1, true)
    assert.matches("CREATED -> PAYING (PREPAY)", dom, 1, true)
    assert.matches("PAYING -> PAID (TRANSACTION.PAID)", dom, 1, true)
    assert.matches("exit 0", text, 1, true)
    -- A screenshot was taken (a PNG).
    assert.equal("\137PNG", (H.read_file(shot) or ""):sub(1, 4))
  end)

  it("says so for an unknown order", function()
    local r = srv:get("/orders/NOSUCH/live")
    assert.equal(200, r.status)
    assert.matches("text/html", r.headers["content-type"], 1, true)
  end)

  it("left no sanitizer report", function() srv:check_sanitizers() end)
end)
