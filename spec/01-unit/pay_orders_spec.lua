-- wxd.pay.orders.apply: a verified notification checked against its order
-- and applied. The memory store does it in one native call
-- (transition_checked); the Lua path (other stores) must answer the same.
local order = require "wxd.order"
local pay_orders = require "wxd.pay.orders"

local seq = 0
local function new_no()
  seq = seq + 1
  return "PO" .. tostring(os.time()) .. "x" .. seq
end

local function notification(id, no, patch)
  local d = { out_trade_no = no, mchid = "1900000001", appid = "wxappid", trade_state = "SUCCESS",
    transaction_id = "4200" .. no:gsub("%D", ""), amount = { total = 100, currency = "CNY" } }
  for k, v in pairs(patch or {}) do d[k] = v end
  return { id = id, event_type = "TRANSACTION.SUCCESS", data = d }
end

local paths = {
  { "one native call (memory store)", function(st) return pay_orders.resolve(st) end },
  { "the Lua checks (a store without transition_checked)", function(st)
    local t = pay_orders.resolve(st)
    t.transition_checked = nil
    return t
  end },
}

for _, path in ipairs(paths) do
  describe("wxd.pay.orders.apply, " .. path[1], function()
    local st, orders
    setup(function()
      st = order.new{ journal = false, close_after = 0 }
      orders = path[2](st)
    end)

    local function paying()
      local no = new_no()
      assert(st:create{ out_trade_no = no, amount = 100, currency = "CNY", appid = "wxappid", mchid = "1900000001" })
      assert(st:transition(no, "PAYING", { key = "prepay" }))
      return no
    end

    it("moves a PAYING order to PAID once; the same id again is a duplicate", function()
      local no = paying()
      local status, o = pay_orders.apply(orders, notification("N1", no))
      assert.same({ "ok", "PAID", 2 }, { status, o.state, o.version })
      assert.equal("4200" .. no:gsub("%D", ""), o.history[2].data.transaction_id)
      status, o = pay_orders.apply(orders, notification("N1", no))
      assert.same({ "duplicate", 2 }, { status, o.version })
    end)

    it("answers 'already' for the same transaction under another id, even once the order moved on", function()
      local no = paying()
      assert.equal("ok", (pay_orders.apply(orders, notification("N1", no))))
      assert(st:transition(no, "CONFIRMED", { key = "confirm" }))
      local status, o = pay_orders.apply(orders, notification("N2", no))
      -- Not a late event (CONFIRMED -> PAID): this payment is the one applied.
      assert.same({ "already", "CONFIRMED", 3, 0 }, { status, o.state, o.version, #o.late })
    end)

    it("records another payment for a CLOSED order as a late event", function()
      local no = paying()
      assert(st:transition(no, "CLOSED", { key = "close" }))
      local status, o = pay_orders.apply(orders, notification("N3", no))
      assert.same({ "late", "CLOSED", 1 }, { status, o.state, #o.late })
    end)

    for _, case in ipairs({
      { "mchid mismatch", { mchid = "1900000002" } },
      { "appid mismatch", { appid = "wxother" } },
      { "appid mismatch", { appid = false } },
      { "amount mismatch", { amount = { total = 101, currency = "CNY" } } },
      { "amount mismatch", { amount = "100" } },
      { "currency mismatch", { amount = { total = 100, currency = "USD" } } },
      { "unknown order", { out_trade_no = "NO-SUCH-ORDER" } },
    }) do
      it("refuses " .. case[1] .. " (400) and leaves the order as it was", function()
        local no = paying()
        local n = notification("NX", no, case[2])
        if n.data.appid == false then n.data.appid = nil end -- no appid at all
        local ok, status, msg = pay_orders.apply(orders, n)
        assert.same({ nil, 400, case[1] }, { ok, status, msg })
        local o = st:get(no)
        assert.same({ "PAYING", 1, 0 }, { o.state, o.version, #o.late })
      end)
    end

    it("takes a payment without a currency as CNY", function()
      local no = paying()
      assert.equal("ok", (pay_orders.apply(orders, notification("N4", no, { amount = { total = 100 } }))))
    end)
  end)
end
