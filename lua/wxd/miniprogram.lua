--- wxd.miniprogram: Mini Program (小程序) user data.
--
-- Data a Mini Program gets from WeChat for its server (wx.getUserInfo,
-- wx.getWeRunData, share info, the old getPhoneNumber) comes as
-- `encryptedData` + `iv`, encrypted with the user's session_key (from
-- code2session, see wxd.wechat): AES-128-CBC, key = base64-decoded
-- session_key, PKCS#7 to 16 bytes, plaintext = JSON with a `watermark`
-- `{ appid, timestamp }` that says for which Mini Program and when WeChat
-- made it.
--
-- decrypt() checks the watermark: the appid must be yours (data made for
-- another Mini Program is refused) and the timestamp recent (`max_age`),
-- so an old capture cannot be replayed. Every decryption failure gives the
-- same error ("decrypt failed"), whatever went wrong.
--
-- @module wxd.miniprogram
-- @usage
-- local mini = require "wxd.miniprogram"
-- local data, err = mini.decrypt(session.session_key, body.encryptedData, body.iv, { appid = APPID })
-- if not data then return 400, { error = err } end

local crypto = require "wxd.crypto"
local json = require "wxd.json"
local now = require("wxd.core").now

local type, error, tonumber = type, error, tonumber

local _M = {}

_M.DEFAULT_MAX_AGE = 600 -- seconds

--- Decrypts encryptedData.
-- @tparam string session_key base64, as code2session gave it (16 bytes)
-- @tparam string encrypted_data base64
-- @tparam string iv base64 (16 bytes)
-- @tparam table opts `appid` (required: the watermark must name it),
--   `max_age` (seconds the watermark may be old, default 600; false: no
--   check), `now` (the current time, for tests)
-- @treturn[1] table the decoded JSON
-- @treturn[2] nil
-- @treturn[2] string "invalid session_key", "invalid iv", "decrypt failed",
--   "watermark appid mismatch", "watermark too old"
function _M.decrypt(session_key, encrypted_data, iv, opts)
  if type(opts) ~= "table" or type(opts.appid) ~= "string" then
    error("wxd.miniprogram.decrypt: opts.appid is required (the watermark must name your appid)", 2)
  end
  local max_age = opts.max_age
  if max_age == nil then max_age = _M.DEFAULT_MAX_AGE end
  if max_age ~= false and (type(max_age) ~= "number" or max_age <= 0) then
    error("wxd.miniprogram.decrypt: opts.max_age must be seconds > 0 or false", 2)
  end
  if type(session_key) ~= "string" or type(encrypted_data) ~= "string" or type(iv) ~= "string" then
    return nil, "decrypt failed"
  end
  local key = crypto.base64_decode(session_key)
  if not key or #key ~= 16 then return nil, "invalid session_key" end
  local ivb = crypto.base64_decode(iv)
  if not ivb or #ivb ~= 16 then return nil, "invalid iv" end
  -- Clients send the base64 with line breaks or spaces sometimes.
  local ct = crypto.base64_decode((encrypted_data:gsub("%s", "")))
  if not ct or #ct == 0 or #ct % 16 ~= 0 then return nil, "decrypt failed" end
  local plain = crypto.aes_cbc_decrypt(key, ivb, ct, 16)
  local data = plain and json.decode(plain)
  if type(data) ~= "table" then return nil, "decrypt failed" end
  local wm = data.watermark
  if type(wm) ~= "table" or wm.appid ~= opts.appid then return nil, "watermark appid mismatch" end
  if max_age then
    local ts = tonumber(wm.timestamp)
    local t = opts.now or now()
    if not ts or t - ts > max_age or ts - t > 300 then return nil, "watermark too old" end
  end
  return data
end

--- The signature of rawData (wx.getUserInfo): sha1_hex(raw_data .. session_key).
-- Compare with the client's `signature` using wxd.crypto.equals.
function _M.raw_data_signature(raw_data, session_key)
  if type(raw_data) ~= "string" or type(session_key) ~= "string" then
    error("wxd.miniprogram.raw_data_signature: raw_data and session_key must be strings", 2)
  end
  return crypto.sha1_hex(raw_data .. session_key)
end

return _M
