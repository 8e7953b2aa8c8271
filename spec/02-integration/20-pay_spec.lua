-- WeChat Pay v3 end to end: a merchant app on wxd.pay (2 workers,
-- spec/fixtures/apps/payclient) against the fake WeChat Pay server
-- (spec/fixtures/apps/fakepay), with keys and certificates made here by
-- the openssl CLI.
local H = require "helpers"
local cjson = require "cjson"
local crypto = require "wxd.crypto"

local MCHID = "1900000001"
local APIV3 = "0123456789abcdef0123456789abcdef"
local PUBKEY_ID = "PUB_KEY_ID_0114232134912410000000000000001"
local MCH_SERIAL = "3775B6A45ACD588826D15E583A95F5DD00000001"
local V2_KEY = "192006250b4c09247ec02edce69f6a2d"

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. tostring(v) .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

-- Keys and certificates, as WeChat Pay's would be (self-signed here).
local function make_keys(dir)
  local function cert(name, serial, cn, days)
    local out, code = H.sh(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout %s.key -out %s.crt "
      .. "-days %d -subj '/CN=%s' -set_serial 0x%s", dir, name, name, days or 30, cn, serial))
    assert(code == 0, out)
  end
  cert("mch", MCH_SERIAL, MCHID)
  cert("plat1", "5157F09EFDC096DE15EBE81A47057A7232F1B8E1", "Tenpay.com Root CA 1")
  cert("plat2", "6A1C3B2F9D8E7F6A5B4C3D2E1F0A9B8C7D6E5F40", "Tenpay.com Root CA 2", 60)
  cert("plat3", "0B1C3B2F9D8E7F6A5B4C3D2E1F0A9B8C7D6E5F40", "never published")
  -- The fake's TLS certificate; the merchant certificate as PKCS#12 bundles
  -- (current format and the legacy RC2 one of WeChat Pay's downloads).
  local out, code = H.sh(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout tls.key -out tls.crt "
    .. "-days 3 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 && "
    .. "openssl pkcs12 -export -inkey mch.key -in mch.crt -out mch.p12 -passout pass:%s && "
    .. "openssl pkcs12 -export -legacy -inkey mch.key -in mch.crt -out mch_legacy.p12 -passout pass:%s && "
    .. "openssl pkcs12 -export -inkey plat3.key -in plat3.crt -out other.p12 -passout pass:%s", dir, MCHID, MCHID, MCHID))
  assert(code == 0, out)
  for _, name in ipairs({ "pub", "forger" }) do
    local kout, kcode = H.sh(string.format(
      "cd %s && openssl genrsa -out %s.key 2048 && openssl rsa -in %s.key -pubout -out %s.pem", dir, name, name, name))
    assert(kcode == 0, kout)
  end
end

local function json(r) return cjson.decode(r.body) end

describe("wxd.pay against the fake WeChat Pay", function()
  local dir, fake, base, hport

  local function ctl(method, path, body)
    local r = fake:request(method, path, { ["Content-Type"] = "application/json" }, body and cjson.encode(body))
    assert.equal(200, r.status, r.body)
    return json(r)
  end

  local function start_client(extra)
    local e = { PAYCLIENT_DIR = dir, FAKEPAY_MCHID = MCHID, FAKEPAY_APIV3_KEY = APIV3, FAKEPAY_PUBKEY_ID = PUBKEY_ID,
                PAY_MCH_SERIAL = MCH_SERIAL, PAY_API_BASE = base,
                PAYCLIENT_JOURNAL = dir .. "/orders-" .. crypto.nonce(8) .. ".journal" }
    for k, v in pairs(extra or {}) do e[k] = v end
    return H.start(H.app("payclient"), { workers = 2, env = env(e) })
  end

  local function call(srv, method, path, body)
    local r = srv:request(method, path, { ["Content-Type"] = "application/json" }, body and cjson.encode(body))
    return r.status, json(r)
  end

  -- Orders: prepaid through the merchant app (recorded by wxd.order), read back from it.
  local seq = 0
  local function fresh_no(tag)
    seq = seq + 1
    return (tag or "O") .. "-" .. seq .. "-" .. crypto.nonce(6)
  end
  local function new_order(srv, tag, amount, kind)
    local no = fresh_no(tag)
    local st, b = call(srv, "POST", "/prepay/" .. (kind or "jsapi"), { out_trade_no = no, amount = amount })
    assert.equal(200, st, cjson.encode(b))
    return no
  end
  local function order_of(srv, no)
    local st, o = call(srv, "GET", "/ctl/order/" .. no)
    assert.equal(200, st, cjson.encode(o))
    return o
  end

  setup(function()
    dir = H.tmpdir()
    make_keys(dir)
    hport = H.free_port()
    fake = H.start(H.app("fakepay"), { workers = 1, args = "--https-listen 127.0.0.1:" .. hport,
      env = env({ FAKEPAY_DIR = dir, FAKEPAY_MCHID = MCHID, FAKEPAY_APIV3_KEY = APIV3, FAKEPAY_PUBKEY_ID = PUBKEY_ID,
                  FAKEPAY_HTTPS = 1 }) })
    base = "http://127.0.0.1:" .. fake.port
  end)
  teardown(function()
    fake:stop()
    fake:cleanup()
    os.execute("rm -rf " .. dir)
  end)

  describe("platform certificate mode", function()
    local srv, url
    local function calls() return select(2, call(srv, "GET", "/ctl/calls")) end
    local function notify(b)
      b.url = b.url or url
      return ctl("POST", "/_ctl/notify", b)
    end

    setup(function()
      ctl("POST", "/_ctl/reset")
      srv = start_client()
      url = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
    end)
    teardown(function() srv:stop(); srv:cleanup() end)
    before_each(function() call(srv, "POST", "/ctl/handler", { mode = "ok" }) end)

    it("makes every order call signed, with every answer verified", function()
      for _, kind in ipairs({ "jsapi", "native", "app", "h5" }) do
        local st, b = call(srv, "POST", "/prepay/" .. kind, { out_trade_no = "O-" .. kind, amount = 88 })
        assert.equal(200, st, cjson.encode(b))
        local d = b.data
        assert.truthy(d.prepay_id or d.code_url or d.h5_url)
      end
      local st, b = call(srv, "GET", "/query/O-jsapi")
      assert.equal(200, st, cjson.encode(b))
      assert.equal("NOTPAY", b.data.trade_state)
      assert.equal(88, b.data.amount.total)
      st, b = call(srv, "GET", "/query_tid/" .. b.data.transaction_id)
      assert.equal(200, st)
      assert.equal("O-jsapi", b.data.out_trade_no)
      st, b = call(srv, "POST", "/close/O-native")
      assert.equal(200, st, cjson.encode(b))
      assert.equal(true, b.data)
      -- Each prepay recorded its order, PAYING once WeChat Pay answered.
      for _, kind in ipairs({ "jsapi", "native", "app", "h5" }) do
        local o = order_of(srv, "O-" .. kind)
        assert.same({ "PAYING", 1, 88, "CNY", MCHID, "wxfakeappid00001" },
          { o.state, o.version, o.amount, o.currency, o.mchid, o.appid })
        assert.same({ "CREATED", "PAYING", "PREPAY", "prepay" },
          { o.history[1].from, o.history[1].to, o.history[1].event, o.history[1].key })
        assert.equal(kind:upper(), o.history[1].data.trade_type)
      end
      assert.equal("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", order_of(srv, "O-jsapi").payer_openid)
      assert.same({ 204 }, notify({ out_trade_no = "O-app" }).statuses)
      assert.equal("PAID", order_of(srv, "O-app").state)
      st, b = call(srv, "POST", "/close/O-app")
      assert.equal(502, st)
      assert.equal("wechatpay", b.error)
      assert.equal("ORDERPAID", b.info.code)
      assert.equal(400, b.info.status)
      st, b = call(srv, "POST", "/refund", { out_trade_no = "O-app", out_refund_no = "R-1", refund = 50, total = 88 })
      assert.equal(200, st, cjson.encode(b))
      assert.equal("REFUNDING", order_of(srv, "O-app").state)
      st, b = call(srv, "GET", "/refund/R-1")
      assert.equal(200, st)
      assert.equal("PROCESSING", b.data.status)
      st, b = call(srv, "GET", "/query/NOPE")
      assert.equal(502, st)
      assert.equal("ORDER_NOT_EXIST", b.info.code)
      local counts = ctl("GET", "/_ctl/counts")
      assert.is_nil(counts.sign_error)
      assert.truthy(counts.certificates >= 1) -- the first answer's serial was fetched
    end)

    it("surfaces WeChat Pay error codes, retryable or not, and refuses an unsigned 5xx body", function()
      ctl("POST", "/_ctl/fail", { status = 429, code = "FREQUENCY_LIMITED", message = "slow down", times = 1 })
      local st, b = call(srv, "GET", "/query/O-jsapi")
      assert.equal(502, st)
      assert.same({ "wechatpay", "FREQUENCY_LIMITED", 429, true },
        { b.error, b.info.code, b.info.status, b.info.retryable })
      ctl("POST", "/_ctl/fail", { status = 502, unsigned = true, times = 1 })
      local _, b2 = call(srv, "GET", "/query/O-jsapi")
      assert.same({ "status", 502, true }, { b2.error, b2.info.status, b2.info.retryable })
      assert.equal(200, (call(srv, "GET", "/query/O-jsapi")))
    end)

    it("gives JSAPI invoke parameters whose paySign the openssl CLI verifies", function()
      local _, p = call(srv, "GET", "/params/wx201410272009395522657a690389285100")
      assert.equal("wxfakeappid00001", p.appId)
      assert.equal("prepay_id=wx201410272009395522657a690389285100", p.package)
      assert.equal("RSA", p.signType)
      assert.truthy(p.timeStamp:match("^%d+$"))
      H.write_file(dir .. "/msg", p.appId .. "\n" .. p.timeStamp .. "\n" .. p.nonceStr .. "\n" .. p.package .. "\n")
      H.write_file(dir .. "/sig", crypto.base64_decode(p.paySign))
      local out, code = H.sh(string.format("cd %s && openssl x509 -in mch.crt -pubkey -noout > mch.pub && "
        .. "openssl dgst -sha256 -verify mch.pub -signature sig msg", dir))
      assert.equal(0, code, out)
      assert.truthy(out:find("Verified OK", 1, true))
    end)

    it("accepts a real notification once: PAID (key: the notification id), then the handler, then 204", function()
      local no = new_order(srv, "REAL")
      local before = calls()
      local r = notify({ id = "N-real-1", out_trade_no = no })
      assert.same({ 204 }, r.statuses)
      local after = calls()
      assert.equal(before.calls + 1, after.calls)
      assert.equal("TRANSACTION.SUCCESS", after.last.event_type)
      assert.equal(MCHID, after.last.data.mchid)
      assert.same({ "PAID", "ok" }, { after.last.order_state, after.last.order_status })
      local o = order_of(srv, no)
      assert.same({ "PAID", 2 }, { o.state, o.version })
      assert.same({ "PAYING", "PAID", "TRANSACTION.SUCCESS", "N-real-1" },
        { o.history[2].from, o.history[2].to, o.history[2].event, o.history[2].key })
      assert.equal(after.last.data.transaction_id, o.history[2].data.transaction_id)
      -- WeChat Pay's retry of a handled notification: 204, no second call, no second transition.
      r = notify({ id = "N-real-1", out_trade_no = no })
      assert.same({ 204 }, r.statuses)
      assert.equal(after.calls, calls().calls)
      assert.equal(2, order_of(srv, no).version)
    end)

    -- Every way a notification can be refused: the status, the message, no
    -- handler call, the order unchanged (PAYING, version 1).
    for _, case in ipairs({
      { "forged", 401, "bad signature" }, { "probe", 401, "bad signature" },
      { "unknown_serial", 401, "bad signature" }, { "stale", 401, "bad signature" },
      { "future", 401, "bad signature" }, { "tampered", 400, "decrypt failed" },
      { "wrong_aad", 400, "decrypt failed" }, { "wrong_nonce", 400, "decrypt failed" },
      { "amount", 400, "amount mismatch", { amount = { total = 8800 } } },
      { "currency", 400, "currency mismatch", { amount = { currency = "USD" } } },
      { "mchid", 400, "mchid mismatch", { mchid = "1900000002" } },
      { "appid", 400, "appid mismatch", { appid = "wxotherappid00001" } },
      { "unknown order", 400, "unknown order", { out_trade_no = "NO-SUCH-ORDER" } },
    }) do
      it("refuses a notification with " .. case[1] .. ": handler not called, order unchanged", function()
        local no = new_order(srv, "REF")
        local before = calls().calls
        local kind = case[4] and "real" or case[1]
        local r = notify({ kind = kind, out_trade_no = no, patch = case[4] })
        assert.same({ case[2] }, r.statuses)
        assert.same({ code = "FAIL", message = case[3] }, cjson.decode(r.bodies[1]))
        assert.equal(before, calls().calls)
        local o = order_of(srv, no)
        assert.same({ "PAYING", 1, 0 }, { o.state, o.version, #o.late })
        assert.equal(404, (call(srv, "GET", "/ctl/order/NO-SUCH-ORDER")))
      end)
    end

    it("refuses a replayed notification (same nonce) the second time", function()
      local no = new_order(srv, "REPLAY")
      local before = calls().calls
      local r = notify({ kind = "replay", out_trade_no = no })
      assert.same({ 204, 400 }, r.statuses)
      assert.equal("replay", cjson.decode(r.bodies[2]).message)
      assert.equal(before + 1, calls().calls)
      assert.equal(2, order_of(srv, no).version)
    end)

    it("answers 5xx when the handler fails or raises, and 204 on WeChat Pay's retry", function()
      local no = new_order(srv, "HFAIL")
      call(srv, "POST", "/ctl/handler", { mode = "fail" })
      local r = notify({ id = "N-fail-1", out_trade_no = no })
      assert.same({ 500 }, r.statuses)
      assert.same({ code = "FAIL", message = "order store down" }, cjson.decode(r.bodies[1]))
      -- The transition is durable before the handler runs; the retries are duplicates of it.
      assert.same({ "PAID", 2 }, { order_of(srv, no).state, order_of(srv, no).version })
      call(srv, "POST", "/ctl/handler", { mode = "raise" })
      assert.same({ 500 }, notify({ id = "N-fail-1", out_trade_no = no }).statuses)
      call(srv, "POST", "/ctl/handler", { mode = "ok" })
      assert.same({ 204 }, notify({ id = "N-fail-1", out_trade_no = no }).statuses)
      assert.equal(3, select(2, call(srv, "GET", "/ctl/calls/N-fail-1")).calls)
      assert.equal("duplicate", calls().last.order_status)
      assert.equal(2, order_of(srv, no).version)
    end)

    it("runs the handler once and moves the order once for 20 concurrent deliveries of one notification", function()
      local no = new_order(srv, "DUP")
      call(srv, "POST", "/ctl/handler", { mode = "slow", delay = 200 })
      local r = notify({ id = "N-dup-1", copies = 20, out_trade_no = no })
      local n204 = 0
      for _, s in ipairs(r.statuses) do
        assert.truthy(s == 204 or s == 500, tostring(s))
        if s == 204 then n204 = n204 + 1 end
      end
      assert.truthy(n204 >= 1)
      assert.equal(1, select(2, call(srv, "GET", "/ctl/calls/N-dup-1")).calls)
      local o = order_of(srv, no)
      assert.same({ "PAID", 2, 2 }, { o.state, o.version, #o.history })
    end)

    it("records a success for a CLOSED order as a late event and answers 204 without the handler", function()
      local no = new_order(srv, "LATE")
      assert.equal(200, (call(srv, "POST", "/ctl/close_local/" .. no)))
      local before = calls().calls
      local r = notify({ id = "N-late-1", out_trade_no = no })
      assert.same({ 204 }, r.statuses)
      assert.equal(before, calls().calls)
      local o = order_of(srv, no)
      assert.same({ "CLOSED", 2, 1 }, { o.state, o.version, #o.late })
      assert.same({ "CLOSED", "PAID", "N-late-1", "TRANSACTION.SUCCESS" },
        { o.late[1].from, o.late[1].to, o.late[1].key, o.late[1].event })
      assert.truthy(o.late[1].data.transaction_id)
      -- The retry: 204, still one late record.
      assert.same({ 204 }, notify({ id = "N-late-1", out_trade_no = no }).statuses)
      assert.equal(1, #order_of(srv, no).late)
      assert.truthy(#srv:log_lines("order late event") >= 1)
    end)

    it("drives PAYERROR to FAILED and refunds through REFUNDING to REFUNDED or REFUND_FAILED", function()
      local no = new_order(srv, "PE")
      assert.same({ 204 }, notify({ out_trade_no = no, trade_state = "PAYERROR" }).statuses)
      assert.equal("FAILED", order_of(srv, no).state)
      -- A refund made with this client: REFUNDING first, REFUNDED by its notification.
      local paid = new_order(srv, "RF", 300)
      assert.same({ 204 }, notify({ out_trade_no = paid }).statuses)
      local st, b = call(srv, "POST", "/refund", { out_trade_no = paid, out_refund_no = "RF-" .. paid, refund = 300,
        total = 300 })
      assert.equal(200, st, cjson.encode(b))
      assert.equal("REFUNDING", order_of(srv, paid).state)
      -- A refund notification whose total differs from the order's is refused.
      local r = notify({ out_refund_no = "RF-" .. paid, patch = { amount = { total = 301 } } })
      assert.same({ 400 }, r.statuses)
      assert.equal("REFUNDING", order_of(srv, paid).state)
      assert.same({ 204 }, notify({ out_refund_no = "RF-" .. paid, id = "N-rf-1" }).statuses)
      local o = order_of(srv, paid)
      assert.same({ "REFUNDED", 4 }, { o.state, o.version })
      assert.same({ "REFUNDING", "REFUNDED", "REFUND.SUCCESS", "N-rf-1" },
        { o.history[4].from, o.history[4].to, o.history[4].event, o.history[4].key })
      -- An abnormal refund: REFUND_FAILED.
      local ab = new_order(srv, "RA", 200)
      assert.same({ 204 }, notify({ out_trade_no = ab }).statuses)
      assert.equal(200, (call(srv, "POST", "/refund", { out_trade_no = ab, out_refund_no = "RA-" .. ab, refund = 200,
        total = 200 })))
      assert.same({ 204 }, notify({ out_refund_no = "RA-" .. ab, refund_status = "ABNORMAL" }).statuses)
      assert.equal("REFUND_FAILED", order_of(srv, ab).state)
      -- A refund of an order that is not paid never reaches WeChat Pay.
      local unpaid = new_order(srv, "RU")
      local n0 = ctl("GET", "/_ctl/counts").refund
      st, b = call(srv, "POST", "/refund", { out_trade_no = unpaid, out_refund_no = "RU-1" })
      assert.equal(502, st)
      assert.same({ "order", "order is PAYING" }, { b.error, b.info.detail })
      assert.equal(n0, ctl("GET", "/_ctl/counts").refund)
    end)

    it("keeps a failed prepay's order CREATED, so that the same out_trade_no can be tried again", function()
      local no = fresh_no("RETRY")
      ctl("POST", "/_ctl/fail", { status = 500, code = "SYSTEM_ERROR", message = "busy", times = 1 })
      local st, b = call(srv, "POST", "/prepay/jsapi", { out_trade_no = no, amount = 500 })
      assert.equal(502, st)
      assert.equal("SYSTEM_ERROR", b.info.code)
      local o = order_of(srv, no)
      assert.same({ "CREATED", 0 }, { o.state, o.version })
      st = call(srv, "POST", "/prepay/jsapi", { out_trade_no = no, amount = 500 })
      assert.equal(200, st)
      assert.same({ "PAYING", 1 }, { order_of(srv, no).state, order_of(srv, no).version })
      -- The same number with another amount is another order: refused before WeChat Pay is asked.
      local n0 = ctl("GET", "/_ctl/counts").jsapi
      st, b = call(srv, "POST", "/prepay/jsapi", { out_trade_no = no, amount = 501 })
      assert.equal(502, st)
      assert.same({ "order", "exists" }, { b.error, b.info.detail })
      assert.equal(n0, ctl("GET", "/_ctl/counts").jsapi)
      -- A paid order is not prepaid again.
      assert.same({ 204 }, notify({ out_trade_no = no }).statuses)
      st, b = call(srv, "POST", "/prepay/jsapi", { out_trade_no = no, amount = 500 })
      assert.same({ 502, "order", "order is PAID" }, { st, b.error, b.info.detail })
    end)

    -- v2 notifications (docs/pay.md, "Orders"): about orders prepaid here.
    local function v2url(name) return "http://127.0.0.1:" .. srv.port .. "/pay/v2/" .. (name or "notify") end
    local tid_seq = 0
    local function fresh_tid()
      tid_seq = tid_seq + 1
      return string.format("42%08d%06d", tid_seq, math.random(0, 999999))
    end
    local function v2_pay(no, amount, extra, opts)
      local pay = { out_trade_no = no, transaction_id = fresh_tid(), total_fee = tostring(amount) }
      for k, v in pairs(extra or {}) do pay[k] = v end
      local b = { url = v2url(), key = V2_KEY, pay = pay }
      for k, v in pairs(opts or {}) do b[k] = v end
      return ctl("POST", "/_ctl/notify_v2", b), pay.transaction_id
    end
    local function handler_calls(id) return select(2, call(srv, "GET", "/ctl/calls/" .. id)).calls end
    local function paid_order(tag, amount)
      local no = new_order(srv, tag, amount)
      local r, tid = v2_pay(no, amount)
      assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
      assert.equal("PAID", order_of(srv, no).state)
      return no, tid
    end

    it("routes a v2 XML refund notification on the v3 URL", function()
      local no, tid = paid_order("V2R", 100)
      local r = ctl("POST", "/_ctl/notify_v2", { url = url, key = V2_KEY, refund = { out_refund_no = "R-v2-1",
        out_trade_no = no, transaction_id = tid } })
      assert.equal(200, r.status)
      assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
      local last = calls().last
      assert.equal("REFUND.SUCCESS", last.event_type)
      assert.equal(2, last.version)
      assert.equal("R-v2-1", last.data.out_refund_no)
      assert.equal("REFUNDED", order_of(srv, no).state)
      local before = calls().calls
      r = ctl("POST", "/_ctl/notify_v2", { url = url, key = "wrong-key-wrong-key-wrong-key-00" })
      assert.truthy(r.body:find("FAIL", 1, true))
      assert.equal(before, calls().calls)
      local no2, tid2 = paid_order("V2R", 100)
      before = calls().calls
      r = ctl("POST", "/_ctl/notify_v2", { url = v2url(), key = V2_KEY,
        refund = { out_refund_no = "R-v2-2", out_trade_no = no2, transaction_id = tid2 } })
      assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
      assert.equal(before + 1, calls().calls)
      assert.equal("REFUNDED", order_of(srv, no2).state)
    end)

    it("serves v2 payment results (MD5 or HMAC-SHA256) and refuses a bad sign and XXE", function()
      local before = calls().calls
      for i, st in ipairs({ "MD5", "HMAC-SHA256" }) do
        local no = new_order(srv, "T-v2-" .. i, 100)
        local r = v2_pay(no, 100, nil, { sign_type = st })
        assert.equal(200, r.status)
        assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
        local last = calls().last
        assert.same({ "TRANSACTION.SUCCESS", 2, no }, { last.event_type, last.version, last.data.out_trade_no })
      end
      assert.equal(before + 2, calls().calls)
      local no = new_order(srv, "T-v2-x", 100)
      local r = v2_pay(no, 100, nil, { key = "another-key" })
      assert.truthy(r.body:find("FAIL", 1, true), r.body)
      r = ctl("POST", "/_ctl/notify_v2", { url = v2url(), raw = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x SYSTEM '
        .. '"file:///etc/passwd">]><xml><return_code>SUCCESS</return_code><out_trade_no>&x;</out_trade_no></xml>' })
      assert.truthy(r.body:find("FAIL", 1, true), r.body)
      assert.is_nil(r.body:find("root:", 1, true))
      assert.equal(before + 2, calls().calls)
      assert.equal("PAYING", order_of(srv, no).state)
    end)

    describe("v2 notifications on orders", function()
      it("moves the order to PAID once for 20 concurrent duplicates, the handler run once", function()
        local no = new_order(srv, "V2DUP", 250)
        local before = calls().calls
        local r, tid = v2_pay(no, 250, nil, { copies = 20 })
        assert.equal(20, #r.statuses)
        for i = 1, 20 do
          assert.equal(200, r.statuses[i])
          assert.truthy(r.bodies[i]:find("SUCCESS", 1, true), r.bodies[i])
        end
        local o = order_of(srv, no)
        assert.same({ "PAID", 2 }, { o.state, o.version })
        local paid = {}
        for _, e in ipairs(o.history) do if e.to == "PAID" then paid[#paid + 1] = e end end
        assert.equal(1, #paid)
        assert.same({ "v2pay:" .. tid, "TRANSACTION.SUCCESS", tid, "SUCCESS" },
          { paid[1].key, paid[1].event, paid[1].data.transaction_id, paid[1].data.trade_state })
        assert.equal(1, handler_calls("v2pay:" .. tid))
        assert.equal(before + 1, calls().calls)
        -- The run may be any copy's: the one that moved the order, or one that found it moved.
        local last = calls().last
        assert.equal("PAID", last.order_state)
        assert.truthy(last.order_status == "ok" or last.order_status == "duplicate", last.order_status)
        -- WeChat Pay's retry later: SUCCESS, nothing more.
        r = v2_pay(no, 250, { transaction_id = tid })
        assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
        assert.equal(2, order_of(srv, no).version)
        assert.equal(before + 1, calls().calls)
      end)

      it("refuses an amount, currency, mchid or appid mismatch and an unknown order: no handler, no change", function()
        local no = new_order(srv, "V2MIS", 300)
        local other = fresh_no("V2OTHER") -- an order of another merchant, in this store
        call(srv, "POST", "/ctl/create_order", { out_trade_no = other, amount = 300, appid = "wxfakeappid00001",
          mchid = "1900000999" })
        assert.equal("PAYING", order_of(srv, other).state)
        local before = calls().calls
        local cases = {
          { no, 301, nil, nil, "amount mismatch" },
          { no, "300.00", nil, nil, "amount mismatch" },
          { no, 300, { total_fee = "" }, nil, "amount mismatch" },
          { no, 300, { fee_type = "USD" }, nil, "currency mismatch" },
          { no, 300, { mch_id = "1900000002" }, nil, "mchid mismatch" },      -- the endpoint's merchant
          { other, 300, nil, nil, "mchid mismatch" },                        -- the order's merchant
          { no, 300, { appid = "wxotherapp000001" }, nil, "appid mismatch" }, -- the endpoint's appid
          { no, 300, { appid = "wxotherapp000001" }, { url = v2url("any_appid") }, "appid mismatch" }, -- the order's
          { fresh_no("V2NONE"), 300, nil, nil, "unknown order" },
        }
        for i, c in ipairs(cases) do
          local r = v2_pay(c[1], c[2], c[3], c[4])
          assert.equal(200, r.status)
          assert.truthy(r.body:find("FAIL", 1, true), "case " .. i .. ": " .. r.body)
          assert.truthy(r.body:find(c[5], 1, true), "case " .. i .. ": " .. r.body)
        end
        assert.equal(before, calls().calls)
        assert.same({ "PAYING", 1 }, { order_of(srv, no).state, order_of(srv, no).version })
        assert.same({ "PAYING", 1 }, { order_of(srv, other).state, order_of(srv, other).version })
        -- The genuine one goes through.
        local r = v2_pay(no, 300)
        assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
        assert.equal("PAID", order_of(srv, no).state)
        assert.equal(before + 1, calls().calls)
      end)

      it("is one transition with the v3 notification of the same payment", function()
        local no = new_order(srv, "V2V3", 120)
        assert.same({ 204 }, notify({ out_trade_no = no }).statuses)
        local tid = select(2, call(srv, "GET", "/query/" .. no)).data.transaction_id
        local before = calls().calls
        local r = v2_pay(no, 120, { transaction_id = tid })
        assert.truthy(r.body:find("SUCCESS", 1, true), r.body)
        assert.same({ "PAID", 2 }, { order_of(srv, no).state, order_of(srv, no).version })
        assert.equal(before, calls().calls)
      end)

      it("moves a refund to REFUNDED once, through REFUNDING, and refuses a mismatch", function()
        local no, tid = paid_order("V2REF", 400)
        local rid = "50" .. fresh_tid()
        local refund = { out_trade_no = no, transaction_id = tid, out_refund_no = "RR-" .. no, refund_id = rid,
          total_fee = "400", refund_fee = "400" }
        local before = calls().calls
        -- Mismatches first: nothing changes, no handler.
        local bad = {
          { { total_fee = "401" }, "amount mismatch" },
          { { out_trade_no = fresh_no("V2NONE") }, "unknown order" },
        }
        for i, c in ipairs(bad) do
          local rf = {}
          for k, v in pairs(refund) do rf[k] = v end
          for k, v in pairs(c[1]) do rf[k] = v end
          local r = ctl("POST", "/_ctl/notify_v2", { url = url, key = V2_KEY, refund = rf })
          assert.truthy(r.body:find("FAIL", 1, true) and r.body:find(c[2], 1, true), "case " .. i .. ": " .. r.body)
        end
        assert.equal(before, calls().calls)
        assert.same({ "PAID", 2 }, { order_of(srv, no).state, order_of(srv, no).version })
        local r = ctl("POST", "/_ctl/notify_v2", { url = url, key = V2_KEY, refund = refund, copies = 20 })
        for i = 1, 20 do assert.truthy(r.bodies[i]:find("SUCCESS", 1, true), r.bodies[i]) end
        local o = order_of(srv, no)
        assert.same({ "REFUNDED", 4 }, { o.state, o.version })
        local id = "v2refund:" .. rid .. ":SUCCESS"
        assert.same({ "REFUNDING", id .. ":REFUNDING" }, { o.history[3].to, o.history[3].key })
        assert.same({ "REFUNDED", id, rid, "SUCCESS" },
          { o.history[4].to, o.history[4].key, o.history[4].data.refund_id, o.history[4].data.refund_status })
        assert.equal(1, handler_calls(id))
        assert.equal(before + 1, calls().calls)
      end)
    end)

    it("follows a certificate rotation with no failed call or notification", function()
      local fetches = ctl("GET", "/_ctl/counts").certificates
      -- The new certificate is published first, then signs.
      ctl("POST", "/_ctl/state", { published = { 1, 2 }, signer = 2 })
      for i = 1, 10 do
        local st, b = call(srv, "GET", "/query/O-jsapi")
        assert.equal(200, st, "call " .. i .. ": " .. cjson.encode(b))
        assert.same({ 204 }, notify({ out_trade_no = new_order(srv, "ROT") }).statuses)
      end
      -- The old one withdrawn: still fine.
      ctl("POST", "/_ctl/state", { published = { 2 }, signer = 2 })
      for _ = 1, 4 do assert.equal(200, (call(srv, "GET", "/query/O-jsapi"))) end
      local n = ctl("GET", "/_ctl/counts").certificates
      assert.truthy(n > fetches and n <= fetches + 2, "fetches: " .. tostring(n - fetches))
      -- An answer signed by a certificate WeChat Pay never published is refused.
      ctl("POST", "/_ctl/state", { signer = 3, published = { 2 } })
      local st, b = call(srv, "GET", "/query/O-jsapi")
      ctl("POST", "/_ctl/state", { signer = 2, published = { 2 } })
      assert.equal(502, st)
      assert.same({ "signature", "unknown serial" }, { b.error, b.info.detail })
    end)

    it("encrypts a sensitive field for the newest platform certificate (OAEP, openssl CLI decrypts)", function()
      local r = srv:request("POST", "/encrypt", {}, "13800138000")
      local b = json(r)
      assert.equal("6A1C3B2F9D8E7F6A5B4C3D2E1F0A9B8C7D6E5F40", b.serial)
      H.write_file(dir .. "/ct", crypto.base64_decode(b.ciphertext))
      local out, code = H.sh(string.format("cd %s && openssl pkeyutl -decrypt -inkey plat2.key -in ct "
        .. "-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1", dir))
      assert.equal(0, code, out)
      assert.equal("13800138000", out)
    end)
  end)

  it("reports WeChat Pay's unsigned 401 for a request it could not verify (a wrong merchant serial)", function()
    ctl("POST", "/_ctl/reset")
    local srv = start_client({ PAY_MCH_SERIAL = "3775B6A45ACD588826D15E583A95F5DD00000002" })
    local ok, err = pcall(function()
      local st, b = call(srv, "POST", "/prepay/native", { out_trade_no = "O-badserial" })
      assert.equal(502, st)
      assert.same({ "status", 401, false, "unsigned 401 answer (SIGN_ERROR)" },
        { b.error, b.info.status, b.info.retryable, b.info.detail })
      assert.is_nil(b.info.code)
      assert.equal(1, ctl("GET", "/_ctl/counts").sign_error)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("holds back calls over its quota per API (ids not counted apart), sending nothing", function()
    ctl("POST", "/_ctl/reset")
    local srv = start_client({ PAY_QUOTA_API_BURST = "2" })
    local ok, err = pcall(function()
      for i = 1, 2 do
        local st, b = call(srv, "GET", "/query/O-quota-" .. i)
        assert.is_not.equal("quota", b.error, cjson.encode(b))
        assert.truthy(st)
      end
      local st, b = call(srv, "GET", "/query/O-quota-3")
      assert.equal(502, st)
      assert.equal("quota", b.error)
      assert.equal("api", b.info.scope)
      assert.truthy(b.info.retry_after > 0)
      assert.equal(2, tonumber(ctl("GET", "/_ctl/counts").query)) -- the third never left
      -- Another API has its own quota.
      local _, c = call(srv, "POST", "/close/O-quota-1")
      assert.is_not.equal("quota", c.error, cjson.encode(c))
      assert.equal(1, tonumber(ctl("GET", "/_ctl/counts").close))
      assert.equal(1, select(2, call(srv, "GET", "/stats")).quota_refusals)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("fails over to the backup host when the primary cannot be reached", function()
    ctl("POST", "/_ctl/reset")
    local srv = start_client({ PAY_API_BASE = "http://127.0.0.1:" .. H.free_port(), PAY_BACKUP_BASE = base })
    local ok, err = pcall(function()
      local st, b = call(srv, "POST", "/prepay/native", { out_trade_no = "O-failover" })
      assert.equal(200, st, cjson.encode(b))
      assert.truthy(select(2, call(srv, "GET", "/stats")).failovers >= 1)
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  it("public key mode: answers and notifications verified with PUB_KEY_ID, no certificate download", function()
    ctl("POST", "/_ctl/reset")
    ctl("POST", "/_ctl/state", { mode = "pubkey" })
    local srv = start_client({ PAY_MODE = "pubkey" })
    local ok, err = pcall(function()
      local st, b = call(srv, "POST", "/prepay/jsapi", { out_trade_no = "O-pk" })
      assert.equal(200, st, cjson.encode(b))
      assert.equal(PUBKEY_ID, ctl("GET", "/_ctl/last")["wechatpay-serial"])
      local r = ctl("POST", "/_ctl/notify", { url = "http://127.0.0.1:" .. srv.port .. "/pay/notify", signer = "pubkey",
        out_trade_no = "O-pk" })
      assert.same({ 204 }, r.statuses)
      -- A platform certificate means nothing to a public-key-only merchant.
      r = ctl("POST", "/_ctl/notify", { url = "http://127.0.0.1:" .. srv.port .. "/pay/notify", signer = 1,
        out_trade_no = new_order(srv, "PK") })
      assert.same({ 401 }, r.statuses)
      assert.is_nil(ctl("GET", "/_ctl/counts").certificates)
      local _, e = call(srv, "POST", "/encrypt")
      assert.equal(PUBKEY_ID, e.serial)
    end)
    srv:stop(); srv:cleanup()
    ctl("POST", "/_ctl/state", { mode = "certs", signer = 1, published = { 1 } })
    assert(ok, err)
  end)

  it("a migration: both the platform certificate and the public key are accepted", function()
    ctl("POST", "/_ctl/reset")
    local srv = start_client({ PAY_MODE = "mixed" })
    local ok, err = pcall(function()
      local nurl = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
      -- WeChat Pay still answers with its certificate...
      ctl("POST", "/_ctl/state", { mode = "certs" })
      assert.equal(200, (call(srv, "POST", "/prepay/native", { out_trade_no = "O-mig-1" })))
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, signer = 1, out_trade_no = "O-mig-1" }).statuses)
      -- ...then with the public key, which the requests name.
      ctl("POST", "/_ctl/state", { mode = "mixed" })
      assert.equal(200, (call(srv, "POST", "/prepay/native", { out_trade_no = "O-mig-2" })))
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, signer = "pubkey", out_trade_no = "O-mig-2" }).statuses)
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, signer = 1,
        out_trade_no = new_order(srv, "MIG", 100, "native") }).statuses)
    end)
    srv:stop(); srv:cleanup()
    ctl("POST", "/_ctl/state", { mode = "certs", signer = 1, published = { 1 } })
    assert(ok, err)
  end)

  it("renews the certificates in the background and answers FAIL past the deadline, 204 once done", function()
    ctl("POST", "/_ctl/reset")
    ctl("POST", "/_ctl/state", { mode = "certs", signer = 1, published = { 1 } })
    -- No refresh on an unknown serial after the first download: only the job can learn plat2.
    local srv = start_client({ PAY_CERT_REFRESH_S = 1, PAY_MISS_REFRESH_S = 3600, PAY_DEADLINE_MS = 300 })
    local ok, err = pcall(function()
      local nurl = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
      assert.equal(200, (call(srv, "POST", "/prepay/native", { out_trade_no = "O-bg" })))
      ctl("POST", "/_ctl/state", { published = { 1, 2 } })
      local n0 = ctl("GET", "/_ctl/counts").certificates
      H.wait_until(function() return ctl("GET", "/_ctl/counts").certificates > n0 end, 10, "a background download")
      ctl("POST", "/_ctl/state", { signer = 2 })
      assert.equal(200, (call(srv, "GET", "/query/O-bg")))
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, out_trade_no = "O-bg" }).statuses)
      -- The 5-second rule (300 ms here): a slow handler gets FAIL in time, and WeChat Pay's retry 204 once it ended.
      call(srv, "POST", "/ctl/handler", { mode = "slow", delay = 1500 })
      local slow_no = new_order(srv, "SLOW")
      local r = ctl("POST", "/_ctl/notify", { url = nurl, id = "N-slow", out_trade_no = slow_no })
      assert.same({ 500 }, r.statuses)
      H.wait_until(function() return select(2, call(srv, "GET", "/ctl/calls")).done >= 2 end, 10, "the slow handler")
      call(srv, "POST", "/ctl/handler", { mode = "ok" })
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, id = "N-slow", out_trade_no = slow_no }).statuses)
      assert.equal(1, select(2, call(srv, "GET", "/ctl/calls/N-slow")).calls)
    end)
    srv:stop(); srv:cleanup()
    ctl("POST", "/_ctl/state", { mode = "certs", signer = 1, published = { 1 } })
    assert(ok, err)
  end)

  it("two processes sharing one Redis: one certificate download, one handler run per notification", function()
    local url = os.getenv("WXD_TEST_REDIS_URL")
    assert(url, "spec/run.sh starts a redis-server and sets WXD_TEST_REDIS_URL")
    ctl("POST", "/_ctl/reset")
    local prefix = "spec:" .. crypto.nonce(8) .. ":"
    local e = { SPEC_REDIS_URL = url, SPEC_STORE_PREFIX = prefix, PAY_MISS_REFRESH_S = 3600 }
    local a = start_client(e)
    local b = start_client(e)
    local ok, err = pcall(function()
      for _ = 1, 3 do
        for _, s in ipairs({ a, b }) do assert.equal(200, (call(s, "POST", "/prepay/native", { out_trade_no = "O-r" }))) end
      end
      assert.equal(1, ctl("GET", "/_ctl/counts").certificates)
      -- One order in Redis for both: paid through b, refunded through a.
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = "http://127.0.0.1:" .. b.port .. "/pay/notify",
        out_trade_no = "O-r" }).statuses)
      assert.equal(200, (call(a, "POST", "/refund", { out_trade_no = "O-r", out_refund_no = "R-redis" })))
      assert.equal("REFUNDING", order_of(b, "O-r").state)
      -- The same refund notification delivered to both processes at once, 10 times each.
      call(a, "POST", "/ctl/handler", { mode = "slow", delay = 300 })
      local http, task = require "wxd.http", require "wxd.task"
      local hs = {}
      for i, s in ipairs({ a, b }) do
        hs[i] = task.spawn(http.post, base .. "/_ctl/notify", cjson.encode({ url = "http://127.0.0.1:" .. s.port
          .. "/pay/notify", id = "N-redis", copies = 10, out_refund_no = "R-redis" }), { timeout = 30 })
      end
      local statuses, n204 = {}, 0
      for i = 1, 2 do
        local r = assert(hs[i]:wait())
        statuses[i] = json(r).statuses
        for _, st in ipairs(statuses[i]) do
          assert.truthy(st == 204 or st == 500, tostring(st))
          if st == 204 then n204 = n204 + 1 end
        end
      end
      assert.truthy(n204 >= 1, cjson.encode(statuses))
      local function runs()
        return select(2, call(a, "GET", "/ctl/calls/N-redis")).calls + select(2, call(b, "GET", "/ctl/calls/N-redis")).calls
      end
      assert.equal(1, runs(), cjson.encode(statuses))
      local o = order_of(a, "O-r")
      assert.same({ "REFUNDED", 4, "N-redis" }, { o.state, o.version, o.history[4].key })
      -- WeChat Pay's retry, to either process: 204 without a second run.
      call(a, "POST", "/ctl/handler", { mode = "ok" })
      for _, s in ipairs({ a, b }) do
        assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = "http://127.0.0.1:" .. s.port .. "/pay/notify",
          id = "N-redis", out_refund_no = "R-redis" }).statuses)
      end
      assert.equal(1, runs())
      assert.equal(4, order_of(b, "O-r").version)
    end)
    a:stop(); a:cleanup()
    b:stop(); b:cleanup()
    assert(ok, err)
  end)

  it("examples/pay: POST /orders, the notification, GET /orders/:no shows PAID with its history", function()
    ctl("POST", "/_ctl/reset")
    local journal = dir .. "/example-" .. crypto.nonce(6) .. ".journal"
    local srv = H.start(H.ROOT .. "/examples/pay", { workers = 2, env = env({ WXD_PAY_MCHID = MCHID,
      WXD_PAY_APPID = "wxfakeappid00001", WXD_PAY_APIV3_KEY = APIV3, WXD_PAY_MCH_KEY_FILE = dir .. "/mch.key",
      WXD_PAY_MCH_SERIAL = MCH_SERIAL, WXD_PAY_API_BASE = base, WXD_PAY_ORDER_JOURNAL = journal }) })
    local ok, err = pcall(function()
      local st, b = call(srv, "POST", "/orders", { description = "Tea", amount_total = 1200,
        openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" })
      assert.equal(200, st, cjson.encode(b))
      local p = b.pay_params
      assert.equal("prepay_id=" .. b.prepay_id, p.package)
      assert.equal("wxfakeappid00001", p.appId)
      assert.equal(1, ctl("GET", "/_ctl/counts").jsapi)
      H.write_file(dir .. "/ex.msg", p.appId .. "\n" .. p.timeStamp .. "\n" .. p.nonceStr .. "\n" .. p.package .. "\n")
      H.write_file(dir .. "/ex.sig", crypto.base64_decode(p.paySign))
      local out, code = H.sh(string.format("cd %s && openssl x509 -in mch.crt -pubkey -noout > mch.pub && "
        .. "openssl dgst -sha256 -verify mch.pub -signature ex.sig ex.msg", dir))
      assert.equal(0, code, out)
      assert.equal(400, (call(srv, "POST", "/orders", { amount_total = 1.5, openid = "o1" })))
      assert.equal(400, (call(srv, "POST", "/orders", { amount_total = 100 })))
      local no = b.out_trade_no
      local o
      st, o = call(srv, "GET", "/orders/" .. no)
      assert.equal(200, st)
      assert.same({ "PAYING", 1200 }, { o.state, o.amount })
      -- WeChat Pay notifies the payment (once refused for a wrong amount, then the real one).
      local nurl = "http://127.0.0.1:" .. srv.port .. "/pay/notify"
      assert.same({ 400 }, ctl("POST", "/_ctl/notify", { url = nurl, out_trade_no = no,
        patch = { amount = { total = 1 } } }).statuses)
      assert.equal("PAYING", select(2, call(srv, "GET", "/orders/" .. no)).state)
      assert.same({ 204 }, ctl("POST", "/_ctl/notify", { url = nurl, out_trade_no = no, id = "N-ex-1" }).statuses)
      st, o = call(srv, "GET", "/orders/" .. no)
      assert.equal(200, st)
      assert.equal("PAID", o.state)
      assert.equal(2, #o.history)
      assert.same({ "CREATED", "PAYING", "PREPAY" }, { o.history[1].from, o.history[1].to, o.history[1].event })
      assert.same({ "PAYING", "PAID", "TRANSACTION.SUCCESS" }, { o.history[2].from, o.history[2].to, o.history[2].event })
      assert.truthy(o.history[2].at >= o.history[1].at and o.history[1].at > 1.7e12)
      assert.is_nil(o.history[2].key) -- the page shows from, to, event, at
      assert.equal(1, #srv:log_lines("order paid"))
      assert.equal(404, (call(srv, "GET", "/orders/NOPE")))
      assert.truthy(H.read_file(journal))
    end)
    srv:stop(); srv:cleanup()
    assert(ok, err)
  end)

  describe("v2 refunds over mutual TLS", function()
    local v2 = require "wxd.pay.v2"
    local function client(p12, sign_type)
      return v2.client({ mchid = MCHID, key = V2_KEY, appid = "wxfakeappid00001", sign_type = sign_type,
        pkcs12 = p12 and H.read_file(dir .. "/" .. p12), api_base = "https://127.0.0.1:" .. hport,
        http = { ca_file = dir .. "/tls.crt" } })
    end
    local refund = { out_trade_no = "T-1", out_refund_no = "R-1", total_fee = 100, refund_fee = 100 }
    local function refunds() return ctl("GET", "/_ctl/counts").v2_refund or 0 end

    it("refunds with the merchant's PKCS#12 bundle, current or legacy, MD5 or HMAC-SHA256", function()
      for _, case in ipairs({ { "mch.p12" }, { "mch_legacy.p12" }, { "mch.p12", "HMAC-SHA256" } }) do
        local r, err, info = client(case[1], case[2]):refund(refund)
        assert(r, case[1] .. ": " .. tostring(err) .. " " .. cjson.encode(info or {}))
        assert.equal("SUCCESS", r.result_code)
        assert.equal("R-1", r.out_refund_no)
      end
      local r, err, info = client("mch.p12"):refund({ out_trade_no = "PAID-NOT", out_refund_no = "R-2",
        total_fee = 1, refund_fee = 1 })
      assert.is_nil(r)
      assert.same({ "wechatpay", "ORDERNOTEXIST" }, { err, info.code })
    end)

    it("gets no answer without the client certificate, or with one the server does not trust", function()
      local before = refunds()
      local r, err = client(nil):request("/secapi/pay/refund", refund)
      assert.is_nil(r)
      assert.equal("tls", err)
      r, err = client("other.p12"):refund(refund)
      assert.is_nil(r)
      assert.equal("tls", err)
      assert.equal(before, refunds())
      assert.has_error(function() client(nil):refund(refund) end)
    end)
  end)
end)
