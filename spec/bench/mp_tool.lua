-- Helper of spec/bench/mp.sh: plays WeChat for the encrypted-message
-- benchmark, with wxd.testing (the same sender the specs use).
--
--   wxd script spec/bench/mp_tool.lua gen OUT COUNT RUN_ID FIRST [bad]
--       writes COUNT signed, encrypted (safe mode) text messages to OUT, one
--       per line: "<path?query>\t<body>". Message i (0-based) has MsgId
--       RUN_ID .. %09d(FIRST + i) and Content "message %09d(FIRST + i)", so
--       ids never repeat as long as the caller hands out disjoint ranges.
--       Timestamps are now. With "bad", msg_signature is forged (all zeros).
--   wxd script spec/bench/mp_tool.lua check BODY_FILE CONTENT
--       opens a reply body: its MsgSignature must verify, it must decrypt
--       with the key and appid, and be a text reply "echo: CONTENT" from the
--       account to the user. Exit 0 when it is, 1 with the reason when not.
--
-- Token, appid and EncodingAESKey come from MP_TOKEN, MP_APPID and
-- MP_AES_KEY (the same ones both servers get).
local testing = require "wxd.testing"

local function env(name)
  local v = os.getenv(name)
  if not v or v == "" then
    io.stderr:write("mp_tool: ", name, " is not set\n")
    os.exit(2)
  end
  return v
end

local ACCOUNT = "gh_bench_account"
local OPENID = "o_bench_user_0000000000000000"

local wx = testing.wechat({ token = env("MP_TOKEN"), appid = env("MP_APPID"), aes_key = env("MP_AES_KEY"),
                            mode = "safe", path = "/wx", account = ACCOUNT, openid = OPENID })

local cmd = ...
local args = { select(2, ...) }

local function usage()
  io.stderr:write("usage: mp_tool.lua gen OUT COUNT RUN_ID FIRST [bad] | check BODY_FILE CONTENT\n")
  return 2
end

if cmd == "gen" then
  local out, count, run_id, first, bad = args[1], tonumber(args[2]), args[3], tonumber(args[4]), args[5]
  if not out or not count or count < 1 or not run_id or not run_id:match("^%d+$") or not first then
    return usage()
  end
  local f = assert(io.open(out, "w"))
  local opts = bad == "bad" and { msg_signature = string.rep("0", 40) } or nil
  local buf, n = {}, 0
  for i = first, first + count - 1 do
    local seq = string.format("%09d", i)
    local b = wx:build({ MsgType = "text", Content = "message " .. seq, MsgId = run_id .. seq }, opts)
    if b.body:find("[\t\n]") then error("mp_tool: a request body has a tab or newline") end
    n = n + 1
    buf[n] = b.url .. "\t" .. b.body .. "\n"
    if n == 1000 then
      f:write(table.concat(buf, "", 1, n))
      n = 0
    end
  end
  f:write(table.concat(buf, "", 1, n))
  f:close()
  return 0
elseif cmd == "check" then
  local file, content = args[1], args[2]
  if not file or not content then return usage() end
  local f = io.open(file, "rb")
  if not f then
    io.stderr:write("mp_tool: cannot read ", file, "\n")
    return 1
  end
  local body = f:read("*a")
  f:close()
  local reply, err = wx:open_reply(body)
  local function fail(why)
    io.stderr:write("mp_tool: wrong reply: ", why, "\n  body: ", body:sub(1, 400), "\n")
    return 1
  end
  if reply == nil then return fail(tostring(err)) end
  if reply == "success" then return fail('"success" instead of a text reply') end
  if body:find("<Encrypt>", 1, true) == nil then return fail("the reply is not encrypted") end
  if reply.MsgType ~= "text" then return fail("MsgType " .. tostring(reply.MsgType)) end
  if reply.Content ~= "echo: " .. content then return fail("Content " .. tostring(reply.Content)) end
  if reply.ToUserName ~= OPENID or reply.FromUserName ~= ACCOUNT then
    return fail("ToUserName/FromUserName " .. tostring(reply.ToUserName) .. "/" .. tostring(reply.FromUserName))
  end
  print("signature ok, decrypts, text reply: " .. reply.Content)
  return 0
end
return usage()
