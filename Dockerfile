# syntax=docker/dockerfile:1
# pgwarden's image: compiled in a build stage, run from a slim one as a non-root user.
#   docker build -t pgwarden .
#   docker run --rm -p 127.0.0.1:6464:6464 -p 127.0.0.1:6465:6465 \
#     -e PGWARDEN_UPSTREAM=db.internal:5432 -e PGWARDEN_ADMIN_TOKEN="$(openssl rand -base64 24)" pgwarden
# Configuration: deploy/docker/pgwarden.yaml (baked in), PGWARDEN_* variables, flags;
# docs/operations.md covers Docker, compose and Kubernetes.

# --- build: every dependency (typescript is a dev one), compile, keep production deps
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
# --ignore-scripts: no dependency's install script runs in the image build. The ones
# package.json's allowScripts admits (embedded-postgres' binaries, esbuild's check)
# serve the tests and the demo, not `pgwarden start`; libpg-query is WebAssembly and
# typescript ships its compiler as a platform package, so neither needs a script.
# It also skips our own `prepare` (which would compile before src/ is here), so the
# build below is explicit.
RUN npm ci --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY bin ./bin
RUN npm run build && npm prune --omit=dev --ignore-scripts

# --- runtime: what `node bin/pgwarden.js start` needs, nothing else
FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    PGWARDEN_CONFIG=/etc/pgwarden/pgwarden.yaml
WORKDIR /app
COPY --from=build /app/package.json ./package.json
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/bin ./bin
# All of src/ as well: the dashboard's files are served from dist/dashboard/public
# (npm run build copies them there) with src/dashboard/public as the fallback, and
# bin/pgwarden.js falls back to the sources (through tsx, a production dependency)
# if dist/ is missing. It is small, and stays right whatever moves inside src/.
COPY --from=build /app/src ./src
COPY deploy/docker/pgwarden.yaml /etc/pgwarden/pgwarden.yaml
# The state file (rules of an instance without a control database) lives here.
RUN mkdir -p /var/lib/pgwarden && chown 1000:1000 /var/lib/pgwarden
# The image's `node` user, by number so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 6464 6465
# /healthz on the admin server (served without the token). The port comes from
# PGWARDEN_ADMIN when set (set it too if your own config file moves the admin port).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["node", "-e", "const a=process.env.PGWARDEN_ADMIN||'0.0.0.0:6465';const i=a.lastIndexOf(':');let h=a.slice(0,i);if(h==='0.0.0.0'||h==='[::]')h='127.0.0.1';fetch('http://'+h+':'+a.slice(i+1)+'/healthz',{signal:AbortSignal.timeout(2500)}).then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["node", "bin/pgwarden.js"]
CMD ["start"]
