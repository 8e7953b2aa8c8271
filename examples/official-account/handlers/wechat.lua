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

--- Mounts the callback URL at /wx.
-- @tparam table app
-- @tparam table mp wxd.config.mp: appid, token, aes_key (false in plaintext mode)
function M.mount(app, mp)
  app:mp("/wx", {
    appid = mp.appid,
    token = mp.token,
    aes_key = mp.aes_key or nil,
    -- The reply of a handler that ends after the deadline would go out through
    -- the customer-service message API: that needs wxd's credentials module
    -- (mp.secret, mp.api_base), which does not exist yet. wxd logs such a
    -- reply as dropped.
  }, M.handlers)
end

return M
