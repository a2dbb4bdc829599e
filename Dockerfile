# syntax=docker/dockerfile:1
# Build stage: install everything and compile TypeScript to dist/.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY bin ./bin
RUN npm ci --ignore-scripts && npm run build && npm prune --omit=dev --ignore-scripts

# Runtime stage: only the compiled code and production dependencies, as a non-root user.
FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    PGWARDEN_LISTEN=0.0.0.0:6464
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/bin ./bin
COPY package.json ./
USER node
EXPOSE 6464 6465
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD node -e "require('net').connect(6464,'127.0.0.1').on('connect',()=>process.exit(0)).on('error',()=>process.exit(1))"
ENTRYPOINT ["node", "bin/pgwarden.js"]
CMD ["start"]
