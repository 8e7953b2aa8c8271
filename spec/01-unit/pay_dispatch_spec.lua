-- wxd.pay.notify.dispatch: a notification's handler runs once per id even
-- when another worker's run of the same id ends between this delivery's
-- first look at the done record and its claim. Other workers are played
-- by wrapping the store's functions, so each interleaving is forced, not
-- hoped for (the 2-worker case with 20 real copies: 20-pay_spec).
local notify = require "wxd.pay.notify"
local store = require "wxd.store"
local crypto = require "wxd.crypto"
local wxd = require "wxd"

local seq = 0
local function dispatcher(handler)
  seq = seq + 1
  return { path = "/pay/notify", prefix = "dispatch" .. seq .. ":", handlers = { default = handler },
    deadline_ms = 2000, done_ttl = 60, run_expire = 10 }
end

local function keys(self, id)
  local base = self.prefix .. "notify:" .. crypto.sha256_hex(id)
  return base .. ":done", base .. ":run"
end

-- Replaces store[name] by wrap(original) until undo() is called.
local function patch(name, wrap)
  local original = store[name]
  store[name] = wrap(original)
  return function() store[name] = original end
end

describe("wxd.pay.notify.dispatch", function()
  local calls, self
  local function handler(_, n)
    calls[n.id] = (calls[n.id] or 0) + 1
    return true
  end
  before_each(function()
    calls = {}
    self = dispatcher(handler)
  end)

  it("runs the handler once, records success and lets go of the claim", function()
    local n = { id = "N-1", event_type = "TRANSACTION.SUCCESS", data = {} }
    assert.is_true(notify.dispatch(self, n, {}))
    assert.is_true(notify.dispatch(self, n, {}))
    assert.equal(1, calls["N-1"])
    local done, run = keys(self, "N-1")
    assert.is_true(store.get(done))
    assert.is_nil(store.get(run))
  end)

  it("does not run again when another worker's run ends between the first look and the claim", function()
    local n = { id = "N-race", event_type = "TRANSACTION.SUCCESS", data = {} }
    local done, run = keys(self, n.id)
    -- The other worker: claimed, ran and succeeded while this delivery
    -- was between store.get(done) and store.add(run).
    local undo = patch("add", function(add)
      return function(key, ...)
        if key == run then store.set(done, true, 60) end
        return add(key, ...)
      end
    end)
    local ok, r = pcall(notify.dispatch, self, n, {})
    undo()
    assert(ok, r)
    assert.is_true(r)
    assert.is_nil(calls[n.id], "the handler ran a second time")
    assert.is_nil(store.get(run), "the claim was left behind")
  end)

  it("a delivery that waited for a running claim does not run once that run succeeded", function()
    local n = { id = "N-wait", event_type = "TRANSACTION.SUCCESS", data = {} }
    local done, run = keys(self, n.id)
    assert.is_true(store.add(run, true, 10)) -- another worker's run
    wxd.timer.after(0.05, function()
      store.set(done, true, 60)
      store.delete(run)
    end)
    assert.is_true(notify.dispatch(self, n, {}))
    assert.is_nil(calls[n.id])
    assert.is_nil(store.get(run))
  end)

  it("runs after a failed run of another worker, and answers FAIL when the claim outlasts the deadline", function()
    local n = { id = "N-fail", event_type = "TRANSACTION.SUCCESS", data = {} }
    local _, run = keys(self, n.id)
    assert.is_true(store.add(run, true, 10))
    wxd.timer.after(0.05, function() store.delete(run) end) -- it failed: no done record
    assert.is_true(notify.dispatch(self, n, {}))
    assert.equal(1, calls[n.id])

    local m = { id = "N-stuck", event_type = "TRANSACTION.SUCCESS", data = {} }
    local _, run2 = keys(self, m.id)
    assert.is_true(store.add(run2, true, 10))
    self.deadline_ms = 100
    local ok, why = notify.dispatch(self, m, {})
    assert.is_nil(ok)
    assert.equal("a delivery of this notification is being handled", why)
    assert.is_nil(calls[m.id])
  end)
end)
