-- The bot's message handlers: a text message is echoed, a new follower is
-- welcomed, everything else is acknowledged ("success").
local log = require "wxd.log"

local M = {}

M.WELCOME = "Welcome! Send me a message and I will echo it."

M.handlers = {
  text = function(msg, ctx)
    return ctx.reply.text("echo: " .. msg.Content)
  end,
  event = {
    subscribe = function(msg, ctx)
      log.info("new follower", { openid = msg.FromUserName })
      return ctx.reply.text(M.WELCOME)
    end,
  },
}

--- Mounts the callback URL at /wx and, with the AppSecret, the JS-SDK
-- configuration endpoint.
-- @tparam table app
-- @tparam table mp wxd.config.mp: appid, token, aes_key (false in plaintext
--   mode), secret and api_base (false: no secret)
function M.mount(app, mp)
  app:mp("/wx", {
    appid = mp.appid,
    token = mp.token,
    aes_key = mp.aes_key or nil,
    -- With the secret, a reply of a handler that ends after the deadline goes
    -- out through the customer-service message API (wxd.wechat fetches and
    -- shares the access_token); without it such a reply is logged as dropped.
    secret = mp.secret or nil,
    api_base = mp.api_base,
  }, M.handlers)
  if not mp.secret then return end
  local wx = require("wxd.wechat").client({ appid = mp.appid, secret = mp.secret, api_base = mp.api_base })
  -- GET /jssdk/config?url=<the page's URL> → { appId, timestamp, nonceStr,
  -- signature } for wx.config on that page.
  app:get("/jssdk/config", wx:jssdk_handler())
end

return M
