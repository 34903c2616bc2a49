// Loopback-only OAuth 2.0 authorization server for token-sidecar interop
// tests, built on oidc-provider (see package.json for the pinned version).
//
//   node server.mjs --port PORT --ttl SECONDS --jwks PATH [--audience URL]
//
// Once listening it prints one JSON line on stdout:
//   {"issuer": "http://127.0.0.1:PORT", "token_url": ".../token", "port": N}
// Everything else (including oidc-provider's own notices) goes to stderr so
// the reader on the other end of stdout only ever sees that line.
//
// Test-only endpoints (never part of a real IdP):
//   GET  /__test__/stats                    request/issue counters
//   POST /__test__/reset                    zero the counters
//   POST /__test__/clients/<id>/secret      {"secret": "..."} rotates it
//
// private_key_jwt assertion `aud`: oidc-provider 9.13.x accepts the issuer
// identifier ("http://127.0.0.1:PORT"), the token endpoint URL
// (".../token"), or the URL of the endpoint being called (the same token
// URL here). `aud` may be a string or an array containing one of those
// values (see OIDCContext.clientJwtAuthExpectedAudience in oidc-provider).

import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

// oidc-provider prints its NOTICE lines with console.info, i.e. to stdout.
// Route them to stderr before the library is loaded (hence the dynamic
// import below) so stdout carries nothing but the ready line.
console.info = console.error;
console.log = console.error;
const { default: Provider, errors } = await import('oidc-provider');

const HERE = dirname(fileURLToPath(import.meta.url));
const HOST = '127.0.0.1';
const DEFAULT_AUDIENCE = 'https://api.qlam.example';
const RESOURCE_SCOPE = 'orders.read orders.write';
const TOKEN_PATH = '/token';
const MAX_TEST_BODY = 16 * 1024;

function fail(message) {
  console.error(`server.mjs: ${message}`);
  process.exit(2);
}

function parseCli() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: 'string' },
        ttl: { type: 'string' },
        jwks: { type: 'string' },
        audience: { type: 'string', default: DEFAULT_AUDIENCE },
      },
      strict: true,
    }));
  } catch (err) {
    fail(err.message);
  }
  const port = Number(values.port);
  const ttl = Number(values.ttl);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    fail('--port must be an integer in 0..65535');
  }
  if (!Number.isInteger(ttl) || ttl <= 0) {
    fail('--ttl must be a positive integer number of seconds');
  }
  if (!values.jwks) {
    fail('--jwks PATH is required');
  }
  if (!URL.canParse(values.audience)) {
    fail('--audience must be an absolute URL');
  }
  return { port, ttl, jwksPath: values.jwks, audience: values.audience };
}

// Client metadata lives in this Map, not in oidc-provider's static
// `clients` option: static clients are frozen at construction, whereas
// Client.find() asks the adapter on every request and keys its cache on a
// hash of the returned metadata. Changing the metadata here is therefore
// enough to rotate a secret in the running provider, with no restart.
function loadClients(jwksPath) {
  const spec = JSON.parse(readFileSync(join(HERE, 'clients.json'), 'utf8'));
  const clientJwks = JSON.parse(readFileSync(jwksPath, 'utf8'));
  const clients = new Map();
  for (const [clientId, entry] of Object.entries(spec)) {
    const metadata = {
      client_id: clientId,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: entry.auth_method,
    };
    if (entry.auth_method === 'private_key_jwt') {
      metadata.jwks = { keys: clientJwks.keys };
    } else {
      metadata.client_secret = entry.secret;
    }
    clients.set(clientId, metadata);
  }
  return clients;
}

// Minimal in-memory adapter. Besides backing Client with the Map above, it
// replaces oidc-provider's bundled development adapter, which is shared
// module state and prints a "development-only" warning on every start.
function makeAdapter(clients) {
  const records = new Map();
  const now = () => Math.floor(Date.now() / 1000);
  const live = (key) => {
    const rec = records.get(key);
    if (rec && rec.expiresAt !== undefined && rec.expiresAt <= now()) {
      records.delete(key);
      return undefined;
    }
    return rec;
  };

  return class MemoryStore {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      if (this.model === 'Client') {
        clients.set(id, structuredClone(payload));
        return;
      }
      const expiresAt = expiresIn ? now() + expiresIn : undefined;
      records.set(this.key(id), { payload: structuredClone(payload), expiresAt });
    }

    async find(id) {
      if (this.model === 'Client') {
        const metadata = clients.get(id);
        return metadata && structuredClone(metadata);
      }
      const rec = live(this.key(id));
      return rec && structuredClone(rec.payload);
    }

    async findByField(field, value) {
      const prefix = `${this.model}:`;
      for (const key of records.keys()) {
        const rec = key.startsWith(prefix) && live(key);
        if (rec && rec.payload[field] === value) {
          return structuredClone(rec.payload);
        }
      }
      return undefined;
    }

    async findByUid(uid) {
      return this.findByField('uid', uid);
    }

    async findByUserCode(userCode) {
      return this.findByField('userCode', userCode);
    }

    async consume(id) {
      const rec = live(this.key(id));
      if (rec) {
        rec.payload.consumed = now();
      }
    }

    async destroy(id) {
      if (this.model === 'Client') {
        clients.delete(id);
        return;
      }
      records.delete(this.key(id));
    }

    async revokeByGrantId(grantId) {
      for (const [key, rec] of records) {
        if (rec.payload.grantId === grantId) {
          records.delete(key);
        }
      }
    }
  };
}

function newStats() {
  return { token_requests: 0, by_client: {}, issued: 0 };
}

async function readJson(ctx) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > MAX_TEST_BODY) {
      return undefined;
    }
    chunks.push(chunk);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    return undefined;
  }
}

function reply(ctx, status, body) {
  ctx.status = status;
  ctx.set('Cache-Control', 'no-store');
  ctx.body = body;
}

// Handles /__test__/*; returns false for any other path.
async function testEndpoint(ctx, state) {
  const { stats, clients } = state;
  if (ctx.path === '/__test__/stats' && ctx.method === 'GET') {
    reply(ctx, 200, stats.current);
    return true;
  }
  if (ctx.path === '/__test__/reset' && ctx.method === 'POST') {
    stats.current = newStats();
    reply(ctx, 200, stats.current);
    return true;
  }
  const match = /^\/__test__\/clients\/([^/]+)\/secret$/.exec(ctx.path);
  if (match && ctx.method === 'POST') {
    const clientId = decodeURIComponent(match[1]);
    const metadata = clients.get(clientId);
    if (!metadata) {
      reply(ctx, 404, { error: 'unknown client' });
      return true;
    }
    if (metadata.client_secret === undefined) {
      reply(ctx, 400, { error: 'client does not use a secret' });
      return true;
    }
    const body = await readJson(ctx);
    if (typeof body?.secret !== 'string' || body.secret.length === 0) {
      reply(ctx, 400, { error: 'expected JSON {"secret": "<non-empty>"}' });
      return true;
    }
    clients.set(clientId, { ...metadata, client_secret: body.secret });
    reply(ctx, 200, { client_id: clientId, rotated: true });
    return true;
  }
  if (ctx.path.startsWith('/__test__/')) {
    reply(ctx, 404, { error: 'unknown test endpoint' });
    return true;
  }
  return false;
}

function signingJwks() {
  // A fresh key per process: tests fetch it from the provider's jwks_uri
  // and never need it to survive a restart.
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: 'idp-rs256', alg: 'RS256', use: 'sig' }] };
}

function buildProvider(issuer, opts, clients) {
  const { ttl, audience } = opts;
  const resourceServer = {
    scope: RESOURCE_SCOPE,
    audience,
    accessTokenTTL: ttl,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };

  return new Provider(issuer, {
    adapter: makeAdapter(clients),
    jwks: signingJwks(),
    clientAuthMethods: [
      'client_secret_basic',
      'client_secret_post',
      'private_key_jwt',
    ],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // Auth0-style clients (token-sidecar among them) name the target
        // API with a non-standard `audience` form field instead of the
        // RFC 8707 `resource` parameter. oidc-provider drops parameters it
        // does not know, but it consults this hook whenever a request
        // carries no `resource`, and the raw parsed form body is still on
        // ctx.oidc.body at that point. Returning the posted `audience`
        // therefore makes it behave exactly as `resource` would, including
        // invalid_target for an unknown value. An explicit `resource`
        // wins, since this hook is not called when one is present.
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) {
            return oneOf;
          }
          if (ctx.oidc.route === 'token') {
            const posted = ctx.oidc.body?.audience;
            if (posted !== undefined && posted !== '') {
              return posted;
            }
          }
          return undefined;
        },
        async getResourceServerInfo(ctx, indicator) {
          if (indicator === audience) {
            return resourceServer;
          }
          throw new errors.InvalidTarget();
        },
      },
    },
    ttl: {
      // Plain client-credentials tokens (no resource) also live --ttl.
      ClientCredentials(ctx, token) {
        return token.resourceServer?.accessTokenTTL ?? ttl;
      },
      AccessToken(ctx, token) {
        return token.resourceServer?.accessTokenTTL ?? ttl;
      },
    },
  });
}

async function main() {
  const opts = parseCli();
  const clients = loadClients(opts.jwksPath);

  // Listen first so --port 0 yields the real port before the issuer (which
  // embeds it) is fixed; nobody knows the port until the ready line.
  const server = createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: HOST, port: opts.port }, resolve);
  });
  const { port } = server.address();
  const issuer = `http://${HOST}:${port}`;

  const provider = buildProvider(issuer, opts, clients);
  const state = { stats: { current: newStats() }, clients };

  provider.on('grant.success', () => {
    state.stats.current.issued += 1;
  });

  provider.use(async (ctx, next) => {
    if (await testEndpoint(ctx, state)) {
      return;
    }
    const isToken = ctx.method === 'POST' && ctx.path === TOKEN_PATH;
    // Keep the counter object across the await: a reset that races with
    // this request must not get it counted after the reset.
    const counters = state.stats.current;
    if (isToken) {
      counters.token_requests += 1;
    }
    await next();
    // The client is known once oidc-provider has looked it up, which
    // happens before the credentials are checked, so wrong-secret attempts
    // count too. Requests naming no known client are only in the total.
    const clientId = isToken ? ctx.oidc?.client?.clientId : undefined;
    if (clientId) {
      counters.by_client[clientId] = (counters.by_client[clientId] ?? 0) + 1;
    }
  });

  server.on('request', provider.callback());

  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);

  const ready = {
    issuer,
    token_url: `${issuer}${TOKEN_PATH}`,
    port,
  };
  process.stdout.write(`${JSON.stringify(ready)}\n`);
}

await main();
