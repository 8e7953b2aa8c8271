-- wxd.pay and wxd.pay.v2 in-process: signatures and decryption checked
-- against the openssl CLI, Node's crypto and WeChat Pay's published
-- samples; every way a notification's verification can fail.
local H = require "helpers"
local cjson = require "cjson"
local crypto = require "wxd.crypto"
local pay = require "wxd.pay"
local v2 = require "wxd.pay.v2"
local wxd = require "wxd"

local APIV3 = "0123456789abcdef0123456789abcdef"
local V2_KEY = "192006250b4c09247ec02edce69f6a2d"
local PUBKEY_ID = "PUB_KEY_ID_0114232134912410000000000000001"

local dir
local function sh_ok(cmd)
  local out, code = H.sh(cmd)
  assert(code == 0, cmd .. ":\n" .. out)
  return out
end
local function shq(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

setup(function()
  dir = H.tmpdir()
  sh_ok(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout mch.key -out mch.crt -days 3 "
    .. "-subj /CN=1900000001 -set_serial 0x3775B6A45ACD588826D15E583A95F5DD00000001 && "
    .. "openssl x509 -in mch.crt -pubkey -noout > mch.pub && "
    .. "openssl req -x509 -newkey rsa:2048 -nodes -keyout plat.key -out plat.crt -days 3 -subj /CN=plat "
    .. "-set_serial 0x5157F09EFDC096DE15EBE81A47057A7232F1B8E1 && "
    .. "openssl genrsa -out pub.key 2048 && openssl rsa -in pub.key -pubout -out pub.pem && "
    .. "openssl genrsa -out other.key 2048", dir))
end)
teardown(function() os.execute("rm -rf " .. dir) end)

local function client(extra)
  local cfg = { mchid = "1900000001", serial = "3775B6A45ACD588826D15E583A95F5DD00000001",
    private_key = H.read_file(dir .. "/mch.key"), apiv3_key = APIV3, appid = "wxd930ea5d5a258f4f",
    api_base = "http://127.0.0.1:1", backup_base = false, background = false, miss_refresh_s = 3600,
    platform_cert_pems = { H.read_file(dir .. "/plat.crt") }, platform_certs = true }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return pay.client(cfg)
end

-- Headers as WeChat Pay signs them (with the platform key unless told).
local function signed(body, o)
  o = o or {}
  local ts = o.ts or math.floor(wxd.now())
  local nonce = o.nonce or crypto.nonce(32)
  local key = crypto.load_private_key(H.read_file(dir .. "/" .. (o.key or "plat.key")))
  return { ["Wechatpay-Timestamp"] = tostring(ts), ["Wechatpay-Nonce"] = nonce,
    ["Wechatpay-Signature"] = crypto.base64_encode(key:sign(ts .. "\n" .. nonce .. "\n" .. body .. "\n")),
    ["Wechatpay-Serial"] = o.serial or "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
    ["Wechatpay-Signature-Type"] = "WECHATPAY2-SHA256-RSA2048" }
end

local function notification_body(plain, aad, nonce)
  nonce = nonce or crypto.nonce(12)
  return cjson.encode({ id = "EV-" .. crypto.nonce(8), event_type = "TRANSACTION.SUCCESS",
    resource_type = "encrypt-resource", resource = { algorithm = "AEAD_AES_256_GCM", associated_data = aad,
      nonce = nonce, ciphertext = crypto.base64_encode(crypto.aes_gcm_encrypt(APIV3, nonce, plain, aad)) } })
end

describe("wxd.pay quotas", function()
  it("count an API once whatever ids its path carries", function()
    local api_of = require("wxd.pay").api_of
    assert.equal("GET /v3/pay/transactions/out-trade-no/:id", api_of("GET", "/v3/pay/transactions/out-trade-no/A1"))
    assert.equal(api_of("GET", "/v3/pay/transactions/out-trade-no/A1"),
      api_of("GET", "/v3/pay/transactions/out-trade-no/B2?mchid=1900000001"))
    assert.equal("POST /v3/pay/transactions/out-trade-no/:id/close",
      api_of("POST", "/v3/pay/transactions/out-trade-no/A1/close"))
    assert.equal("GET /v3/pay/transactions/id/:id", api_of("GET", "/v3/pay/transactions/id/4200001"))
    assert.equal("GET /v3/refund/domestic/refunds/:id", api_of("GET", "/v3/refund/domestic/refunds/R1"))
    assert.equal("POST /v3/refund/domestic/refunds", api_of("POST", "/v3/refund/domestic/refunds"))
    assert.are_not.equal(api_of("GET", "/v3/certificates"), api_of("POST", "/v3/pay/transactions/jsapi"))
  end)
end)

describe("wxd.pay.v2 signatures", function()
  local sample = { appid = "wxd930ea5d5a258f4f", body = "test", device_info = "1000", mch_id = "10000100",
                   nonce_str = "ibuaiVcKdpRxkhJA" }

  it("match WeChat Pay's published example (MD5 and HMAC-SHA256)", function()
    assert.equal("9A0A8659F005D6984697E2CA0A9CF3B7", v2.sign(sample, V2_KEY))
    assert.equal("6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6",
      v2.sign(sample, V2_KEY, "HMAC-SHA256"))
  end)

  it("match the openssl CLI on random parameters; empty values and sign are left out", function()
    for _ = 1, 5 do
      local p = { sign = "X", empty = "", total_fee = math.random(1, 100000), out_trade_no = crypto.nonce(20),
        body = "中文 " .. crypto.nonce(10), nonce_str = crypto.nonce(32) }
      local s = v2.sign_string(p, V2_KEY)
      assert.is_nil(s:find("empty=", 1, true))
      assert.is_nil(s:find("sign=", 1, true))
      H.write_file(dir .. "/v2msg", s)
      local md5 = sh_ok("openssl dgst -md5 -r " .. dir .. "/v2msg"):match("^(%x+)")
      local hmac = sh_ok("openssl dgst -sha256 -hmac " .. V2_KEY .. " -r " .. dir .. "/v2msg"):match("^(%x+)")
      assert.equal(md5:upper(), v2.sign(p, V2_KEY))
      assert.equal(hmac:upper(), v2.sign(p, V2_KEY, "HMAC-SHA256"))
    end
  end)

  it("verify accepts either algorithm and refuses any change", function()
    local p = {}
    for k, v in pairs(sample) do p[k] = v end
    p.sign = v2.sign(p, V2_KEY)
    assert.is_true(v2.verify(p, V2_KEY))
    p.sign_type = "HMAC-SHA256" -- declared HMAC, signed MD5: accepted (WeChat Pay does this)
    p.sign = v2.sign(p, V2_KEY)
    assert.is_true(v2.verify(p, V2_KEY))
    p.sign = v2.sign(p, V2_KEY, "HMAC-SHA256")
    assert.is_true(v2.verify(p, V2_KEY))
    p.body = "tesT"
    assert.same({ nil, "bad signature" }, { v2.verify(p, V2_KEY) })
    p.body = "test"
    assert.same({ nil, "bad signature" }, { v2.verify(p, "another key") })
    p.sign = nil
    assert.same({ nil, "bad signature" }, { v2.verify(p, V2_KEY) })
  end)

  it("decrypts req_info encrypted by the openssl CLI (AES-256-ECB, key = md5 hex of the v2 key)", function()
    local root = "<root><out_refund_no><![CDATA[R-1]]></out_refund_no><refund_status><![CDATA[SUCCESS]]>"
      .. "</refund_status><refund_fee><![CDATA[100]]></refund_fee></root>"
    H.write_file(dir .. "/root.xml", root)
    local keyhex = crypto.hex_encode(crypto.md5_hex(V2_KEY))
    local b64 = sh_ok(string.format("openssl enc -aes-256-ecb -K %s -base64 -A -in %s/root.xml", keyhex, dir))
    local t = assert(v2.decrypt_req_info(b64, V2_KEY))
    assert.same({ out_refund_no = "R-1", refund_status = "SUCCESS", refund_fee = "100" }, t)
    assert.same({ nil, "decrypt failed" }, { v2.decrypt_req_info(b64, "another key") })
    assert.same({ nil, "decrypt failed" }, { v2.decrypt_req_info("!!", V2_KEY) })
  end)

  it("refuses XML with a DOCTYPE (XXE), in decode and in a notification", function()
    local xxe = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
      .. "<xml><return_code>SUCCESS</return_code><appid>&x;</appid></xml>"
    assert.same({ nil, "doctype not allowed" }, { v2.decode(xxe) })
    local ep = v2.notify_endpoint("/n", { key = V2_KEY, mchid = "10000100" }, {}, nil)
    local n, why = ep:open(xxe)
    assert.is_nil(n)
    assert.equal("xml", why)
  end)
end)

describe("wxd.pay v3 signatures", function()
  it("signs requests as the openssl CLI verifies them", function()
    local c = client()
    local body = '{"mchid":"1900000001","out_trade_no":"T1"}'
    local a = pay.authorization({ mchid = c.mchid, serial = c.serial, key = c.key, method = "POST",
      url_path = "/v3/pay/transactions/jsapi", body = body, timestamp = 1554208460,
      nonce = "593BEC0C930BF1AFEB40B4A08C8FB242" })
    local sig = a:match('signature="([^"]+)"')
    assert.equal('WECHATPAY2-SHA256-RSA2048 mchid="1900000001",nonce_str="593BEC0C930BF1AFEB40B4A08C8FB242",'
      .. 'timestamp="1554208460",serial_no="3775B6A45ACD588826D15E583A95F5DD00000001",signature="' .. sig .. '"', a)
    H.write_file(dir .. "/req", "POST\n/v3/pay/transactions/jsapi\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n"
      .. body .. "\n")
    H.write_file(dir .. "/req.sig", crypto.base64_decode(sig))
    assert.truthy(sh_ok(string.format("cd %s && openssl dgst -sha256 -verify mch.pub -signature req.sig req", dir))
      :find("Verified OK", 1, true))
    -- PKCS#1 v1.5 is deterministic: the CLI's own signature is the same bytes.
    local cli = sh_ok(string.format("cd %s && openssl dgst -sha256 -sign mch.key req | base64 -w0", dir))
    assert.equal(cli, sig)
  end)

  it("decrypts a resource that Node's crypto encrypted (AES-256-GCM), and nothing altered", function()
    local out, code = H.sh("command -v node")
    if code ~= 0 then return pending("node is not installed: " .. out) end
    local js = [[
      const c = require('crypto');
      const nonce = 'a1b2c3d4e5f6';
      const ci = c.createCipheriv('aes-256-gcm', Buffer.from(process.argv[1]), Buffer.from(nonce));
      ci.setAAD(Buffer.from('transaction'));
      const ct = Buffer.concat([ci.update(process.argv[2], 'utf8'), ci.final(), ci.getAuthTag()]);
      console.log(JSON.stringify({ algorithm: 'AEAD_AES_256_GCM', nonce, associated_data: 'transaction',
                                   ciphertext: ct.toString('base64') }));
    ]]
    local plain = '{"out_trade_no":"T-node","amount":{"total":1}}'
    local r = cjson.decode(sh_ok("node -e " .. shq(js) .. " " .. APIV3 .. " " .. shq(plain)))
    assert.equal(plain, pay.decrypt_resource(APIV3, r))
    local bad = { associated_data = "refund" }
    for k, v in pairs(r) do if bad[k] == nil then bad[k] = v end end
    assert.same({ nil, "decrypt failed" }, { pay.decrypt_resource(APIV3, bad) })
    bad.associated_data, bad.nonce = r.associated_data, "000000000000"
    assert.same({ nil, "decrypt failed" }, { pay.decrypt_resource(APIV3, bad) })
    local ct = crypto.base64_decode(r.ciphertext)
    bad.nonce, bad.ciphertext = r.nonce, crypto.base64_encode(ct:sub(1, -2) .. string.char(bit.bxor(ct:byte(-1), 1)))
    assert.same({ nil, "decrypt failed" }, { pay.decrypt_resource(APIV3, bad) })
    assert.same({ nil, "decrypt failed" }, { pay.decrypt_resource(("x"):rep(32), r) })
  end)

  it("encrypts sensitive fields with OAEP (SHA-1) that Node decrypts, naming the public key id", function()
    local out, code = H.sh("command -v node")
    if code ~= 0 then return pending("node is not installed: " .. out) end
    local c = client({ public_key = H.read_file(dir .. "/pub.pem"), public_key_id = PUBKEY_ID })
    local ct, serial = c:encrypt("张三")
    assert.equal(PUBKEY_ID, serial)
    local js = [[
      const c = require('crypto'); const fs = require('fs');
      const pt = c.privateDecrypt({ key: fs.readFileSync(process.argv[1]), oaepHash: 'sha1',
        padding: c.constants.RSA_PKCS1_OAEP_PADDING }, Buffer.from(process.argv[2], 'base64'));
      process.stdout.write(pt.toString('utf8'));
    ]]
    assert.equal("张三", sh_ok("node -e " .. shq(js) .. " " .. dir .. "/pub.key " .. ct))
    assert.same({ nil, "message too long" }, { c:encrypt(("x"):rep(215)) })
  end)
end)

describe("wxd.pay verification", function()
  local c
  before_each(function() c = client() end)
  local body = '{"code":"SUCCESS"}'

  it("accepts WeChat Pay's signature over the raw body", function()
    assert.same({ true, "5157F09EFDC096DE15EBE81A47057A7232F1B8E1" }, { c:verify(signed(body), body) })
    local lower = {}
    for k, v in pairs(signed(body)) do lower[k:lower()] = v end
    assert.is_true((c:verify(lower, body)))
  end)

  local function refused(h, b, detail)
    local ok, kind, info = c:verify(h, b or body)
    assert.is_nil(ok)
    assert.equal("signature", kind)
    assert.equal(detail, info.detail)
  end

  it("refuses a changed body, another key, a probe, an unknown serial, missing headers", function()
    refused(signed(body), body .. " ", "bad signature")
    refused(signed(body, { key = "other.key" }), body, "bad signature")
    local h = signed(body)
    h["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" .. crypto.base64_encode(crypto.random_bytes(64))
    refused(h, body, "bad signature")
    refused(signed(body, { serial = "0011223344" }), body, "unknown serial") -- the download fails: no host
    refused(signed(body, { serial = PUBKEY_ID }), body, "unknown serial")
    h = signed(body)
    h["Wechatpay-Nonce"] = nil
    refused(h, body, "missing headers")
  end)

  it("refuses timestamps 5 minutes or more away, on both sides", function()
    local t = math.floor(wxd.now())
    refused(signed(body, { ts = t - 301 }), body, "stale timestamp")
    refused(signed(body, { ts = t + 301 }), body, "stale timestamp")
    assert.is_true((c:verify(signed(body, { ts = t - 290 }), body)))
    local h = signed(body)
    h["Wechatpay-Timestamp"] = "12a"
    refused(h, body, "bad timestamp")
  end)

  it("accepts the public key by its id in public key mode", function()
    local pk = client({ public_key = H.read_file(dir .. "/pub.pem"), public_key_id = PUBKEY_ID,
                        platform_certs = false, platform_cert_pems = {} })
    assert.is_true((pk:verify(signed(body, { key = "pub.key", serial = PUBKEY_ID }), body)))
    local ok, _, info = pk:verify(signed(body), body)
    assert.is_nil(ok)
    assert.equal("unknown serial", info.detail)
  end)

  it("opens a notification once: a replayed nonce, bad ciphertext, AAD or nonce are refused", function()
    local b = notification_body('{"out_trade_no":"T1"}', "transaction")
    local h = signed(b)
    local n = assert(c:notification(h, b))
    assert.equal("T1", n.data.out_trade_no)
    assert.equal("TRANSACTION.SUCCESS", n.event_type)
    assert.same({ nil, "replay" }, { (function(x, y) return x, y end)(c:notification(h, b)) })
    -- A different AAD or nonce in the resource changes the body: re-signed, so only the decryption can tell.
    local t = cjson.decode(notification_body('{"out_trade_no":"T1"}', "transaction"))
    t.resource.associated_data = "refund"
    local b2 = cjson.encode(t)
    assert.same({ nil, "decrypt failed" }, { (function(x, y) return x, y end)(c:notification(signed(b2), b2)) })
    t.resource.associated_data, t.resource.nonce = "transaction", "abcdefabcdef"
    b2 = cjson.encode(t)
    assert.same({ nil, "decrypt failed" }, { (function(x, y) return x, y end)(c:notification(signed(b2), b2)) })
  end)
end)
