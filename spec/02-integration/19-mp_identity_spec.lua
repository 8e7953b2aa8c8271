-- What makes two WeChat messages "the same", over real HTTP (2 workers):
-- distinct events and messages each run their handler once with their own
-- reply; WeChat's retries and a captured request's replays never run it
-- twice, also after the record would have expired under a TTL shorter than
-- the timestamp window; a Mini Program JSON push's MsgId is its own, not a
-- nested one; a late reply that cannot be built does not hold the retries
-- back; a logged message shows no openid.
--
-- The WeChat client below is written here, apart from the wxd code it
-- checks: SHA-1 and AES-256-CBC by the openssl command line, the message
-- key from WeChat's published sample (the hex in fixtures/mp/conf.lua),
-- and the plaintext layout, PKCS#7 and the documents written by hand.
local H = require "helpers"
local cjson = require "cjson"
local wxd = require "wxd"
local C = require "fixtures.mp.conf"

local TOKEN, APPID, CORP_ID = "identity_token_01", "wxidentity000001", "wwidentity000001"
local KEY_HEX = C.sample.aes_key_hex
local IV_HEX = KEY_HEX:sub(1, 32)
local ACCOUNT = "gh_identity0001"
local USER_A, USER_B = "oIdentityUserA000000000000000", "oIdentityUserB000000000000000"

local dir

local function env(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "='" .. v .. "'" end
  table.sort(parts)
  return table.concat(parts, " ")
end

local function sh(cmd)
  local out, code = H.sh(cmd)
  assert(code == 0, cmd .. ": " .. out)
  return out
end

local files = 0
local function file(content)
  files = files + 1
  local path = dir .. "/in" .. files
  H.write_file(path, content)
  return path
end

-- WeChat's signature: sha1 hex of the sorted strings, concatenated.
local function signature(...)
  local parts = { ... }
  table.sort(parts)
  return (sh("openssl dgst -sha1 -r " .. file(table.concat(parts))):match("^(%x+)"))
end

local function be32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
end

local function random16()
  local f = assert(io.open("/dev/urandom", "rb"))
  local s = f:read(16)
  f:close()
  return s
end

-- 16 random bytes, the length, the document, the receive id; PKCS#7 to 32.
local function encrypt(doc, receive_id)
  local plain = random16() .. be32(#doc) .. doc .. receive_id
  local pad = 32 - #plain % 32
  plain = plain .. string.rep(string.char(pad), pad)
  local out = sh("openssl enc -aes-256-cbc -nopad -K " .. KEY_HEX .. " -iv " .. IV_HEX .. " -in " .. file(plain)
                 .. " | openssl base64 -A")
  return (out:gsub("%s+$", ""))
end

local function decrypt(b64, receive_id)
  local plain = sh("openssl base64 -d -A -in " .. file(b64) .. " | openssl enc -d -aes-256-cbc -nopad -K "
                   .. KEY_HEX .. " -iv " .. IV_HEX)
  plain = plain:sub(1, -plain:byte(-1) - 1)
  local b1, b2, b3, b4 = plain:byte(17, 20)
  local len = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  assert(plain:sub(21 + len) == receive_id, "the reply names another receive id")
  return plain:sub(21, 20 + len)
end

-- An XML document from { { name, value }, ... } (strings in CDATA).
local function xml(fields)
  local out = { "<xml>" }
  for _, f in ipairs(fields) do
    local v = type(f[2]) == "number" and tostring(f[2]) or "<![CDATA[" .. f[2] .. "]]>"
    out[#out + 1] = "<" .. f[1] .. ">" .. v .. "</" .. f[1] .. ">"
  end
  out[#out + 1] = "</xml>"
  return table.concat(out)
end

local function xml_field(doc, name)
  local v = doc:match("<" .. name .. ">(.-)</" .. name .. ">")
  return v and (v:match("^<!%[CDATA%[(.*)%]%]>$") or v)
end

-- The request WeChat sends for a document: opts.path, opts.kind ("mp",
-- "wecom", "mini": JSON), opts.plaintext, opts.timestamp, opts.nonce.
local function build(doc, opts)
  local ts = tostring(opts.timestamp or math.floor(wxd.now()))
  local nonce = opts.nonce or tostring(math.random(100000000, 999999999))
  local receive_id = opts.kind == "wecom" and CORP_ID or APPID
  if opts.plaintext then
    return { url = opts.path .. "?signature=" .. signature(TOKEN, ts, nonce) .. "&timestamp=" .. ts .. "&nonce=" .. nonce,
             body = doc }
  end
  local enc = encrypt(doc, receive_id)
  local query = "timestamp=" .. ts .. "&nonce=" .. nonce .. "&msg_signature=" .. signature(TOKEN, ts, nonce, enc)
  local body
  if opts.kind == "wecom" then
    body = xml({ { "ToUserName", CORP_ID }, { "AgentID", "1000002" }, { "Encrypt", enc } })
  else
    query = "signature=" .. signature(TOKEN, ts, nonce) .. "&" .. query .. "&encrypt_type=aes"
    body = opts.kind == "mini" and cjson.encode({ ToUserName = ACCOUNT, Encrypt = enc })
      or xml({ { "ToUserName", ACCOUNT }, { "Encrypt", enc } })
  end
  return { url = opts.path .. "?" .. query, body = body }
end

local srv

local function post(req)
  return srv:request("POST", req.url, { ["Content-Type"] = "text/xml" }, req.body)
end

-- The reply's Content (its signature checked and decrypted when encrypted),
-- or "success".
local function content(r, opts)
  assert.equal(200, r.status, r.body)
  if r.body == "success" then return "success" end
  if opts.plaintext then return xml_field(r.body, "Content") end
  local receive_id = opts.kind == "wecom" and CORP_ID or APPID
  local enc, sig, ts, nonce
  if opts.kind == "mini" then
    local t = cjson.decode(r.body)
    enc, sig, ts, nonce = t.Encrypt, t.MsgSignature, tostring(t.TimeStamp), t.Nonce
  else
    enc, sig = xml_field(r.body, "Encrypt"), xml_field(r.body, "MsgSignature")
    ts, nonce = xml_field(r.body, "TimeStamp"), xml_field(r.body, "Nonce")
  end
  assert.equal(signature(TOKEN, ts, nonce, enc), sig, "the reply's MsgSignature")
  local doc = decrypt(enc, receive_id)
  if opts.kind == "mini" then return cjson.decode(doc).Content end
  return xml_field(doc, "Content")
end

-- Sends a document as WeChat would (a fresh nonce, timestamp and random
-- prefix each time, as WeChat's retries have) and returns the reply's Content.
local function say(doc, opts)
  return content(post(build(doc, opts)), opts)
end

local function runs(name) return srv:get_json("/runs?name=" .. name).runs end

local function log_lines(text) return srv:log_lines(text) end

describe("wxd.mp message identity, over HTTP", function()
  setup(function()
    math.randomseed(os.time())
    dir = H.tmpdir()
    srv = H.start(H.app("mp_identity"), { workers = 2, env = env({
      WXD_MP_TOKEN = TOKEN, WXD_MP_APPID = APPID, SPEC_MP_CORP_ID = CORP_ID, WXD_MP_AES_KEY = C.sample.aes_key }) })
  end)
  teardown(function()
    if srv then srv:stop(); srv:cleanup() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("runs two CLICK events of one user in one second once each, each with its own reply", function()
    local t = math.floor(wxd.now())
    local function click(key)
      return xml({ { "ToUserName", ACCOUNT }, { "FromUserName", USER_A }, { "CreateTime", t },
                   { "MsgType", "event" }, { "Event", "CLICK" }, { "EventKey", key } })
    end
    local mp = { path = "/mp" }
    assert.equal("CLICK:MENU_K1 run 1", say(click("MENU_K1"), mp))
    assert.equal("CLICK:MENU_K2 run 1", say(click("MENU_K2"), mp))
    -- WeChat's retry of the first one: the same document, signed and encrypted anew.
    assert.equal("CLICK:MENU_K1 run 1", say(click("MENU_K1"), mp))
    assert.equal(1, runs("event_CLICK:MENU_K1"))
    assert.equal(1, runs("event_CLICK:MENU_K2"))
  end)

  it("tells TEMPLATESENDJOBFINISH events apart by their MsgID", function()
    local t = math.floor(wxd.now())
    local function finished(id)
      return xml({ { "ToUserName", ACCOUNT }, { "FromUserName", USER_A }, { "CreateTime", t },
                   { "MsgType", "event" }, { "Event", "TEMPLATESENDJOBFINISH" }, { "MsgID", id },
                   { "Status", "success" } })
    end
    local mp = { path = "/mp" }
    assert.equal("TEMPLATESENDJOBFINISH:200163836 run 1", say(finished(200163836), mp))
    assert.equal("TEMPLATESENDJOBFINISH:200163840 run 1", say(finished(200163840), mp))
    assert.equal("TEMPLATESENDJOBFINISH:200163836 run 1", say(finished(200163836), mp))
  end)

  it("handles WeCom contact changes of different users, all from sys in one second", function()
    local t = math.floor(wxd.now())
    local function change(user)
      return xml({ { "ToUserName", CORP_ID }, { "FromUserName", "sys" }, { "CreateTime", t },
                   { "MsgType", "event" }, { "Event", "change_contact" }, { "ChangeType", "update_user" },
                   { "UserID", user }, { "Position", "engineer" } })
    end
    local wecom = { path = "/wecom", kind = "wecom" }
    assert.equal("success", say(change("zhangsan"), wecom))
    assert.equal("success", say(change("lisi"), wecom))
    assert.equal("success", say(change("zhangsan"), wecom)) -- a retry
    assert.equal(1, runs("wecom_update_user_zhangsan"))
    assert.equal(1, runs("wecom_update_user_lisi"))
  end)

  it("scopes a MsgId by its sender: another user's message with the same MsgId gets its own reply", function()
    local t = math.floor(wxd.now())
    local function text(user, words)
      return xml({ { "ToUserName", ACCOUNT }, { "FromUserName", user }, { "CreateTime", t },
                   { "MsgType", "text" }, { "Content", words }, { "MsgId", "42" } })
    end
    local mp = { path = "/mp" }
    assert.equal("hello from A from " .. USER_A .. " run 1", say(text(USER_A, "hello from A"), mp))
    assert.equal("hello from B from " .. USER_B .. " run 1", say(text(USER_B, "hello from B"), mp))
    assert.equal("hello from A from " .. USER_A .. " run 1", say(text(USER_A, "hello from A"), mp))
    assert.equal(1, runs("text_" .. USER_A .. "_42"))
    assert.equal(1, runs("text_" .. USER_B .. "_42"))
  end)

  it("takes a Mini Program JSON push's own MsgId, every digit, never a nested one", function()
    local t = math.floor(wxd.now())
    local function push(id)
      return '{"ToUserName":"' .. ACCOUNT .. '","FromUserName":"' .. USER_A .. '","CreateTime":' .. t
        .. [[,"MsgType":"text","Content":"{\"MsgId\":7} [\"x\"]","Ext":{"MsgId":42,"List":[{"MsgId":43},"}"]},]]
        .. '"MsgId":' .. id .. "}"
    end
    local mini = { path = "/mini", kind = "mini" }
    assert.equal("MsgId 6000000000000000123 run 1", say(push("6000000000000000123"), mini))
    -- The same double, another message: not merged with the first.
    assert.equal("MsgId 6000000000000000124 run 1", say(push("6000000000000000124"), mini))
    assert.equal("MsgId 6000000000000000123 run 1", say(push("6000000000000000123"), mini))
  end)

  it("keeps the record of a request as long as a replay of it would be accepted (window 600 s)", function()
    local ts = math.floor(wxd.now()) + 590 -- 10 s short of the window's far end
    local doc = xml({ { "ToUserName", ACCOUNT }, { "FromUserName", USER_A }, { "CreateTime", ts },
                      { "MsgType", "text" }, { "Content", "early" }, { "MsgId", "7001" } })
    local r = post(build(doc, { path = "/wide", plaintext = true, timestamp = ts }))
    assert.equal("run 1", xml_field(r.body, "Content"))
    local records = srv:get_json("/records?appid=wxwide").records
    assert.equal(1, #records)
    -- Accepted until now passes ts + 600.
    local accepted_for = ts + 600 - wxd.now()
    assert.truthy(records[1].ttl >= accepted_for,
                  "the record lives " .. records[1].ttl .. " s, a replay is accepted for " .. accepted_for .. " s")
  end)

  it("never runs a replayed request twice, even when dedup_ttl is set shorter than the window", function()
    local ts = math.floor(wxd.now()) + 4 -- accepted until now + 9 (window 5 s)
    local doc = xml({ { "ToUserName", ACCOUNT }, { "FromUserName", USER_A }, { "CreateTime", ts },
                      { "MsgType", "text" }, { "Content", "pay me" }, { "MsgId", "7002" } })
    local captured = build(doc, { path = "/replay", plaintext = true, timestamp = ts })
    assert.equal("run 1", xml_field(post(captured).body, "Content"))
    wxd.sleep(1500) -- past the configured dedup_ttl (1 s), well inside the window
    local r = post(captured)
    assert.equal(200, r.status, r.body)
    assert.equal("run 1", xml_field(r.body, "Content"))
    assert.equal(1, runs("replay_7002"))
    assert.truthy(#log_lines("mp: dedup_ttl raised") > 0)
  end)

  it("answers a retry at once when a late reply cannot be built (no FromUserName), the run lock released", function()
    local doc = xml({ { "ToUserName", ACCOUNT }, { "FromUserName", "" }, { "CreateTime", math.floor(wxd.now()) },
                      { "MsgType", "text" }, { "Content", "800" }, { "MsgId", "9001" } })
    -- Deadline 300 ms: answered success, the handler goes on for 800 ms.
    local r = post(build(doc, { path = "/late-short", plaintext = true }))
    assert.equal(200, r.status)
    assert.equal("success", r.body)
    H.wait_until(function() return runs("late_9001") == 1 end, 10, "the slow handler")
    -- The same account at a path with a 30 s deadline: a retry there waits
    -- for the run lock as long as its deadline allows, and the lock lasts
    -- 600 s unless released. It must come back well before either.
    local req = build(doc, { path = "/late-long", plaintext = true })
    local out = srv:raw("POST " .. req.url .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                        .. #req.body .. "\r\n\r\n" .. req.body, { timeout = 10 })
    assert.truthy(out ~= "", "no answer within 10 s: the retry waits for the run lock")
    local retry = H.parse_responses(out)[1]
    assert.equal(200, retry.status)
    assert.equal("success", retry.body)
    assert.equal(1, runs("late_9001"))
    assert.equal(0, runs("send_custom"))
    H.wait_until(function() return #log_lines("late reply dropped: the message has no FromUserName") == 1 end, 5,
                 "the dropped late reply in the log")
  end)

  it("logs a whole message with its openids masked", function()
    local user = "oMaskedUser0000000000000abcd"
    local doc = xml({ { "ToUserName", ACCOUNT }, { "FromUserName", user }, { "CreateTime", math.floor(wxd.now()) },
                      { "MsgType", "text" }, { "Content", "log me" }, { "MsgId", "8001" } })
    assert.equal("log me from " .. user .. " run 1", say(doc, { path = "/mp" }))
    H.wait_until(function() return #log_lines('"Content":"log me"') == 1 end, 5, "the message in the log")
    local line = cjson.decode(log_lines('"Content":"log me"')[1])
    assert.equal("oMas****abcd", line.FromUserName)
    assert.equal("gh_i****0001", line.ToUserName)
    assert.falsy(srv:log_text():find(user, 1, true), "the openid in clear")
  end)
end)
