-- RSA keys, X.509 certificates and PKCS#12 bundles of wxd.crypto, checked
-- against the openssl command line: every key, certificate, CA and bundle is
-- made by the CLI at test time, every field is compared with what the CLI
-- prints, and signatures and OAEP ciphertexts cross in both directions.
local crypto = require "wxd.crypto"
local H = require "helpers"

local dir
local function path(name) return dir .. "/" .. name end
local function read(name) return (assert(H.read_file(path(name)), name)) end

local function run(script)
  local out, code = H.sh("cd " .. dir .. " && " .. script)
  assert(code == 0, out)
  return out
end

local SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1" -- shaped like a WeChat Pay serial
local SUBJECT = "/C=CN/ST=广东省/L=深圳市/O=财付通支付科技有限公司/OU=财付通支付科技有限公司/CN=1900009191"

setup(function()
  dir = H.tmpdir()
  H.write_file(path("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
  H.write_file(path("leaf.ext"), "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
  run([[
    set -e
    openssl req -x509 -newkey rsa:2048 -nodes -keyout root.key -out root.pem -days 3650 \
      -subj "/C=CN/O=Tenpay.com/CN=Tenpay.com Root CA" 2>/dev/null
    openssl req -new -newkey rsa:2048 -nodes -keyout inter.key -out inter.csr \
      -subj "/C=CN/O=Tenpay.com/CN=Tenpay.com Intermediate CA" 2>/dev/null
    openssl x509 -req -in inter.csr -CA root.pem -CAkey root.key -set_serial 0x0A01 -days 1825 \
      -extfile ca.ext -out inter.pem 2>/dev/null
    openssl genrsa -out leaf.key 2048 2>/dev/null
    openssl req -new -utf8 -key leaf.key -out leaf.csr -subj "]] .. SUBJECT .. [["
    openssl x509 -req -in leaf.csr -CA inter.pem -CAkey inter.key -set_serial 0x]] .. SERIAL .. [[ \
      -days 1825 -extfile leaf.ext -out leaf.pem 2>/dev/null
    openssl rsa -in leaf.key -traditional -out leaf.pkcs1.pem 2>/dev/null
    openssl rsa -in leaf.key -pubout -out leaf.pub 2>/dev/null
    openssl rsa -in leaf.key -RSAPublicKey_out -out leaf.pkcs1.pub 2>/dev/null
    openssl pkcs8 -topk8 -in leaf.key -passout pass:p8-pass -out leaf.enc8.pem
    openssl rsa -in leaf.key -traditional -aes256 -passout pass:p1-pass -out leaf.enc1.pem 2>/dev/null
    cat inter.pem root.pem > chain.pem
    openssl pkcs12 -export -inkey leaf.key -in leaf.pem -certfile chain.pem -passout pass:1900009191 -out modern.p12
    openssl pkcs12 -export -legacy -inkey leaf.key -in leaf.pem -passout pass:1900009191 -out legacy.p12
    openssl pkcs12 -export -inkey leaf.key -in leaf.pem -passout pass: -out nopass.p12
    openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem -days 30 -subj "/CN=Other CA" 2>/dev/null
    openssl genrsa -out k1024.pem 1024 2>/dev/null
    openssl genrsa -out k3072.pem 3072 2>/dev/null
  ]])
end)

teardown(function() if dir then os.execute("rm -rf " .. dir) end end)

describe("keys", function()
  it("loads PKCS#8 and PKCS#1 private keys, plain and encrypted, to the same key", function()
    local ref = assert(crypto.load_private_key(read("leaf.key"))):public_pem()
    assert.equal(read("leaf.pub"), ref)
    for _, c in ipairs({ { "leaf.key" }, { "leaf.pkcs1.pem" }, { "leaf.enc8.pem", "p8-pass" },
                         { "leaf.enc1.pem", "p1-pass" } }) do
      local k = assert(crypto.load_private_key(read(c[1]), c[2]))
      assert.is_true(k:is_private())
      assert.equal(2048, k:bits())
      assert.equal(ref, k:public_pem(), c[1])
    end
  end)

  it("loads SubjectPublicKeyInfo and PKCS#1 public keys", function()
    for _, f in ipairs({ "leaf.pub", "leaf.pkcs1.pub" }) do
      local k = assert(crypto.load_public_key(read(f)))
      assert.is_false(k:is_private())
      assert.equal(read("leaf.pub"), k:public_pem())
    end
  end)

  it("other key sizes", function()
    assert.equal(1024, assert(crypto.load_private_key(read("k1024.pem"))):bits())
    local k = assert(crypto.load_private_key(read("k3072.pem")))
    assert.equal(3072, k:bits())
    assert.equal(384, #k:sign("x"))
    assert.is_true(k:verify("x", k:sign("x")))
    assert.equal("y", k:decrypt(k:encrypt("y")))
    assert.truthy(k:encrypt(string.rep("m", 384 - 42)))
  end)

  it("many keys are collected without leaks (make asan checks)", function()
    local pem = read("leaf.key")
    for _ = 1, 50 do crypto.load_private_key(pem) end
    collectgarbage()
    collectgarbage()
  end)
end)

describe("certificates", function()
  local leaf
  before_each(function() leaf = assert(crypto.load_certificate(read("leaf.pem"))) end)

  local function cli(args, file)
    return (run("openssl x509 -in " .. (file or "leaf.pem") .. " -noout " .. args):gsub("\n$", ""))
  end

  local months = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10,
                   Nov = 11, Dec = 12 }
  -- "notBefore=Nov 26 04:25:10 2026 GMT" -> seconds since the epoch.
  local function cli_date(s)
    local mon, d, hh, mm, ss, y = s:match("=(%a+)%s+(%d+) (%d+):(%d+):(%d+) (%d+) GMT")
    local days = 0
    for yy = 1970, tonumber(y) - 1 do
      days = days + ((yy % 4 == 0 and (yy % 100 ~= 0 or yy % 400 == 0)) and 366 or 365)
    end
    local mdays = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }
    local yn = tonumber(y)
    if yn % 4 == 0 and (yn % 100 ~= 0 or yn % 400 == 0) then mdays[2] = 29 end
    for m = 1, months[mon] - 1 do days = days + mdays[m] end
    days = days + tonumber(d) - 1
    return ((days * 24 + tonumber(hh)) * 60 + tonumber(mm)) * 60 + tonumber(ss)
  end

  it("serial number: upper-case hex, as `openssl x509 -serial` prints it", function()
    assert.equal(SERIAL, leaf:serial())
    assert.equal("serial=" .. leaf:serial(), cli("-serial"))
    local inter = assert(crypto.load_certificate(read("inter.pem")))
    assert.equal("0A01", inter:serial()) -- the leading zero nibble stays
    assert.equal("serial=0A01", cli("-serial", "inter.pem"))
  end)

  it("subject and issuer in RFC 2253 form with UTF-8 as is", function()
    assert.equal("CN=1900009191,OU=财付通支付科技有限公司,O=财付通支付科技有限公司,L=深圳市,ST=广东省,C=CN",
      leaf:subject())
    assert.equal("subject=" .. leaf:subject(), cli("-subject -nameopt RFC2253,-esc_msb"))
    assert.equal("CN=Tenpay.com Intermediate CA,O=Tenpay.com,C=CN", leaf:issuer())
    assert.equal("issuer=" .. leaf:issuer(), cli("-issuer -nameopt RFC2253,-esc_msb"))
  end)

  it("validity dates in seconds since the epoch", function()
    assert.equal(cli_date(cli("-startdate")), leaf:not_before())
    assert.equal(cli_date(cli("-enddate")), leaf:not_after())
    assert.is_true(math.abs(leaf:not_before() - os.time()) < 300)
    assert.equal(1825 * 86400, leaf:not_after() - leaf:not_before())
  end)

  it("SHA-256 fingerprint in upper-case hex", function()
    local want = cli("-fingerprint -sha256"):match("=(.*)$"):gsub(":", "")
    assert.equal(want, leaf:fingerprint())
    assert.equal(64, #leaf:fingerprint())
  end)

  it("public key and PEM", function()
    assert.equal(run("openssl x509 -in leaf.pem -noout -pubkey"), leaf:public_key():public_pem())
    assert.equal(read("leaf.pem"), leaf:pem())
    local again = assert(crypto.load_certificate(leaf:pem()))
    assert.equal(leaf:fingerprint(), again:fingerprint())
    -- The certificate's key checks what the private key signed.
    local key = assert(crypto.load_private_key(read("leaf.key")))
    assert.is_true(leaf:public_key():verify("msg", key:sign("msg")))
  end)

  it("loads a bundle", function()
    local list = assert(crypto.load_certificates(read("chain.pem")))
    assert.equal(2, #list)
    assert.equal("0A01", list[1]:serial())
    assert.equal("CN=Tenpay.com Root CA,O=Tenpay.com,C=CN", list[2]:subject())
    -- load_certificate takes the first one of a bundle.
    assert.equal("0A01", assert(crypto.load_certificate(read("chain.pem"))):serial())
  end)

  describe("verify against a CA bundle", function()
    it("a chain through an intermediate", function()
      assert.is_true(leaf:verify(read("root.pem"), { intermediates = read("inter.pem") }))
      assert.is_true(leaf:verify(read("chain.pem")))
      local root = assert(crypto.load_certificate(read("root.pem")))
      local inter = assert(crypto.load_certificate(read("inter.pem")))
      assert.is_true(leaf:verify(root, { intermediates = { inter } }))
      assert.is_true(leaf:verify({ inter, root }))
      assert.is_true(inter:verify(root))
      assert.is_true(root:verify(root))
    end)

    it("fails without the intermediate, with another CA, with only the intermediate", function()
      local v, err, why = leaf:verify(read("root.pem"))
      assert.is_nil(v)
      assert.equal("certificate verify failed", err)
      assert.equal("unable to get local issuer certificate", why)
      v, err = leaf:verify(read("other.pem"), { intermediates = read("inter.pem") })
      assert.is_nil(v)
      assert.equal("certificate verify failed", err)
      -- A trusted intermediate is not enough: the chain must reach a root.
      v, err = leaf:verify(read("inter.pem"))
      assert.is_nil(v)
      assert.equal("certificate verify failed", err)
    end)

    it("checks validity at the given time", function()
      local chain = read("chain.pem")
      assert.is_true(leaf:verify(chain, { time = leaf:not_before() + 10 }))
      local v, err, why = leaf:verify(chain, { time = leaf:not_after() + 10 })
      assert.is_nil(v)
      assert.equal("certificate verify failed", err)
      assert.equal("certificate has expired", why)
      v, err, why = leaf:verify(chain, { time = leaf:not_before() - 86400 })
      assert.is_nil(v)
      assert.equal("certificate verify failed", err)
      assert.equal("certificate is not yet valid", why)
    end)
  end)
end)

describe("PKCS#12", function()
  local ref
  setup(function() ref = read("leaf.pub") end)

  it("modern (AES, PBKDF2) bundle with CA certificates", function()
    local key, cert, cas = crypto.load_pkcs12(read("modern.p12"), "1900009191")
    assert.truthy(key, cert)
    assert.equal(ref, key:public_pem())
    assert.is_true(key:is_private())
    assert.equal(SERIAL, cert:serial())
    assert.equal(2, #cas)
    local serials = { cas[1]:serial(), cas[2]:serial() }
    table.sort(serials)
    assert.truthy(serials[1] == "0A01" or serials[2] == "0A01")
    assert.is_true(cert:verify(cas))
    assert.is_true(cert:public_key():verify("m", key:sign("m")))
  end)

  it("legacy (RC2-40) bundle, as WeChat Pay's apiclient_cert.p12", function()
    local key, cert, cas = crypto.load_pkcs12(read("legacy.p12"), "1900009191")
    assert.truthy(key, cert)
    assert.equal(ref, key:public_pem())
    assert.equal(SERIAL, cert:serial())
    assert.same({}, cas)
    local v, err = crypto.load_pkcs12(read("legacy.p12"), "1900009192")
    assert.is_nil(v)
    assert.equal("bad passphrase", err)
  end)

  it("a bundle with an empty passphrase", function()
    local key = crypto.load_pkcs12(read("nopass.p12"), "")
    assert.equal(ref, key:public_pem())
  end)
end)

describe("SHA256withRSA against the openssl CLI", function()
  local lengths = { 0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4095, 4096 }
  local wechat = "GET\n/v3/certificates\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"

  it("our signatures equal the CLI's (PKCS#1 v1.5 is deterministic) and verify both ways", function()
    local key = assert(crypto.load_private_key(read("leaf.key")))
    local pub = assert(crypto.load_public_key(read("leaf.pub")))
    local msgs = { wechat }
    for _, n in ipairs(lengths) do msgs[#msgs + 1] = crypto.random_bytes(n) end
    local script = {}
    for i, m in ipairs(msgs) do
      H.write_file(path("m" .. i), m)
      H.write_file(path("s" .. i), key:sign(m))
      script[#script + 1] = string.format(
        "openssl dgst -sha256 -sign leaf.key -out c%d m%d && openssl dgst -sha256 -verify leaf.pub -signature s%d m%d",
        i, i, i, i)
    end
    local out = run(table.concat(script, " && "))
    local _, verified = out:gsub("Verified OK", "")
    assert.equal(#msgs, verified)
    for i, m in ipairs(msgs) do
      local cli_sig = read("c" .. i)
      assert.equal(crypto.hex_encode(cli_sig), crypto.hex_encode(read("s" .. i)), "message " .. i)
      assert.is_true(pub:verify(m, cli_sig))
    end
  end)
end)

describe("RSA-OAEP (SHA-1, MGF1-SHA-1) against the openssl CLI", function()
  local OPTS = "-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1"

  it("every plaintext length 0..214 crosses both ways", function()
    local key = assert(crypto.load_private_key(read("leaf.key")))
    local pub = assert(crypto.load_public_key(read("leaf.pkcs1.pub")))
    local msgs, script = {}, {}
    for n = 0, 214 do
      local m = crypto.random_bytes(n)
      msgs[n] = m
      H.write_file(path("p" .. n), m)
      H.write_file(path("o" .. n), pub:encrypt(m))
      script[#script + 1] = string.format(
        "openssl pkeyutl -encrypt -pubin -inkey leaf.pub %s -in p%d -out e%d && "
          .. "openssl pkeyutl -decrypt -inkey leaf.key %s -in o%d -out d%d", OPTS, n, n, OPTS, n, n)
    end
    H.write_file(path("oaep.sh"), "set -e\n" .. table.concat(script, "\n") .. "\n")
    run("sh oaep.sh")
    for n = 0, 214 do
      local theirs = read("e" .. n)
      assert.equal(256, #theirs)
      assert.equal(msgs[n], key:decrypt(theirs), "CLI ciphertext of length " .. n)
      assert.equal(msgs[n], read("d" .. n), "our ciphertext of length " .. n)
    end
  end)

  it("encryption is randomized", function()
    local pub = assert(crypto.load_public_key(read("leaf.pub")))
    assert.are_not.equal(pub:encrypt("same"), pub:encrypt("same"))
  end)
end)
