package org.fhirmatch.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.IDaoRegistry;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import jakarta.persistence.EntityManagerFactory;
import java.net.InetAddress;
import java.util.HashMap;
import java.util.Map;
import javax.sql.DataSource;
import org.hibernate.cfg.AvailableSettings;
import org.hibernate.dialect.Dialect;
import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.WebApplicationType;
import org.springframework.boot.web.embedded.tomcat.TomcatServletWebServerFactory;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.context.support.PropertySourcesPlaceholderConfigurer;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

/**
 * A HAPI FHIR JPA server for R4 on an in-memory H2 database, for fhirmatch's integration tests.
 *
 * <p>No Spring Boot auto-configuration: every bean is declared here or in the HAPI configuration
 * classes imported below, so what the server does is what this file says. Embedded Tomcat binds
 * the address and port given as {@code --fhirmatch.host} and {@code --fhirmatch.port} (defaults
 * 127.0.0.1 and 8080); the FHIR base is {@code http://HOST:PORT/fhir}.
 *
 * <p>Features: the R4 REST API with client-assigned ids for every type, rest-hook Subscriptions,
 * Bulk Data {@code $export} (system, Patient and Group level), {@code $validate} against the R4
 * core StructureDefinitions. At {@code /fhir-r5}: {@code $validate} only, for the R5 shapes of the
 * resources fhirmatch writes (see {@link R5Validation}). Off: narratives, full-text indexing (Lucene), the web UI.
 */
@Configuration
@EnableTransactionManagement
@Import({
    JpaR4Config.class,
    ThreadPoolFactoryConfig.class,
    SubscriptionSubmitterConfig.class,
    SubscriptionProcessorConfig.class,
    SubscriptionChannelConfig.class,
    JpaBatch2Config.class,
    Batch2JobsConfig.class
})
public class HapiServer {

    private static final Logger LOG = LoggerFactory.getLogger(HapiServer.class);

    public static void main(String[] args) {
        SpringApplication app = new SpringApplication(HapiServer.class);
        app.setWebApplicationType(WebApplicationType.SERVLET);
        app.setBannerMode(org.springframework.boot.Banner.Mode.OFF);
        app.setLogStartupInfo(false);
        app.setAllowCircularReferences(true);
        app.run(args);
        LOG.info("HAPI FHIR JPA server ready");
    }

    /** Resolves the {@code @Value} placeholders (there is no auto-configuration to add one). */
    @Bean
    public static PropertySourcesPlaceholderConfigurer placeholderConfigurer() {
        return new PropertySourcesPlaceholderConfigurer();
    }

    /**
     * Batch jobs (Bulk export) advance on maintenance passes, once a minute by default: every two
     * seconds here, so an export of test data completes in seconds rather than minutes.
     */
    @Bean
    public static BeanPostProcessor fastJobMaintenance() {
        return new BeanPostProcessor() {
            @Override
            public Object postProcessBeforeInitialization(Object bean, String name) {
                if (bean instanceof JobMaintenanceServiceImpl maintenance) {
                    maintenance.setScheduledJobFrequencyMillis(2000);
                }
                return bean;
            }
        };
    }

    // ---- web server -------------------------------------------------------------------------

    @Bean
    public TomcatServletWebServerFactory webServerFactory(
            @Value("${fhirmatch.host:127.0.0.1}") String host, @Value("${fhirmatch.port:8080}") int port)
            throws Exception {
        TomcatServletWebServerFactory factory = new TomcatServletWebServerFactory();
        factory.setAddress(InetAddress.getByName(host));
        factory.setPort(port);
        // FHIR search URLs carry '|' (system|code) unescaped in practice
        factory.addConnectorCustomizers(connector -> connector.setProperty("relaxedQueryChars", "|[]{}"));
        return factory;
    }

    @Bean
    public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer server) {
        ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, "/fhir/*");
        registration.setName("fhir");
        registration.setLoadOnStartup(1);
        return registration;
    }

    /** Validation only, for the R5 shapes fhirmatch writes to R5 servers (see R5Validation). */
    @Bean
    public ServletRegistrationBean<RestfulServer> r5ValidationServlet() {
        ServletRegistrationBean<RestfulServer> registration =
                new ServletRegistrationBean<>(R5Validation.server(), "/fhir-r5/*");
        registration.setName("r5Validation");
        return registration;
    }

    // ---- database ---------------------------------------------------------------------------

    @Bean(destroyMethod = "close")
    public DataSource dataSource(@Value("${fhirmatch.jdbc-url:jdbc:h2:mem:fhirmatch;DB_CLOSE_DELAY=-1}") String url) {
        HikariConfig config = new HikariConfig();
        config.setJdbcUrl(url);
        config.setUsername("sa");
        config.setPassword("");
        config.setDriverClassName("org.h2.Driver");
        config.setMaximumPoolSize(10);
        return new HikariDataSource(config);
    }

    @Primary
    @Bean
    public LocalContainerEntityManagerFactoryBean entityManagerFactory(
            ConfigurableListableBeanFactory beanFactory,
            FhirContext fhirContext,
            JpaStorageSettings storageSettings,
            DataSource dataSource) {
        LocalContainerEntityManagerFactoryBean factory =
                HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
        Map<String, Object> props = new HashMap<>();
        props.put(AvailableSettings.DIALECT, HapiFhirH2Dialect.class.getName());
        props.put(AvailableSettings.HBM2DDL_AUTO, "update");
        props.put(AvailableSettings.SCANNER, "org.hibernate.boot.archive.scan.internal.DisabledScanner");
        props.put(
                AvailableSettings.PHYSICAL_NAMING_STRATEGY,
                "org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
        props.put(AvailableSettings.STATEMENT_BATCH_SIZE, "20");
        props.put(AvailableSettings.USE_QUERY_CACHE, "false");
        props.put(AvailableSettings.USE_SECOND_LEVEL_CACHE, "false");
        props.put(AvailableSettings.SHOW_SQL, "false");
        // no Hibernate Search (Lucene) index
        props.put("hibernate.search.enabled", "false");
        factory.setPersistenceUnitName("HAPI_PU");
        factory.setJpaPropertyMap(props);
        factory.setDataSource(dataSource);
        return factory;
    }

    @Primary
    @Bean
    public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
        JpaTransactionManager manager = new JpaTransactionManager();
        manager.setEntityManagerFactory(entityManagerFactory);
        return manager;
    }

    @Primary
    @Bean
    public HibernatePropertiesProvider hibernatePropertiesProvider() {
        HapiFhirH2Dialect dialect = new HapiFhirH2Dialect();
        return new HibernatePropertiesProvider() {
            @Override
            public Dialect getDialect() {
                return dialect;
            }
        };
    }

    // ---- HAPI settings ----------------------------------------------------------------------

    @Bean
    public JpaStorageSettings storageSettings() {
        JpaStorageSettings settings = new JpaStorageSettings();
        // client-assigned ids for every resource type, numeric ones included; the server's own are UUIDs
        settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
        settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
        settings.setAllowMultipleDelete(true);
        settings.setExpungeEnabled(true);
        settings.setDeleteExpungeEnabled(true);
        settings.setHibernateSearchIndexFullText(false);
        settings.setHibernateSearchIndexSearchParams(false);
        settings.setAdvancedHSearchIndexing(false);
        // Bulk export jobs move on as soon as a step finishes instead of waiting for the next
        // maintenance pass
        settings.setJobFastTrackingEnabled(true);
        return settings;
    }

    @Bean
    public SubscriptionSettings subscriptionSettings() {
        SubscriptionSettings settings = new SubscriptionSettings();
        settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
        // hand changes to the matcher right after commit, not on the next scheduled pass
        settings.setSubscriptionChangeQueuedImmediately(true);
        return settings;
    }

    @Bean
    public PartitionSettings partitionSettings() {
        return new PartitionSettings();
    }

    @Bean
    public IEmailSender emailSender() {
        // only rest-hook channels are enabled; the subscription module still wants a sender bean
        return details -> {
            throw new UnsupportedOperationException("email subscriptions are not enabled");
        };
    }

    @Bean
    public IBinaryStorageSvc binaryStorageSvc() {
        return new DatabaseBinaryContentStorageSvcImpl();
    }

    @Bean
    public IFulltextSearchSvc fullTextSearchSvc() {
        return new FulltextSearchSvcImpl();
    }

    @Bean
    public IHSearchSortHelper hSearchSortHelper(ISearchParamRegistry registry) {
        return new HSearchSortHelperImpl(registry);
    }

    @Bean
    public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
        return new StaleSearchDeletingSvcImpl();
    }

    @Bean
    public DatabaseBackedPagingProvider databaseBackedPagingProvider(
            @Value("${fhirmatch.default-page-size:20}") int defaultPageSize,
            @Value("${fhirmatch.max-page-size:200}") int maxPageSize) {
        DatabaseBackedPagingProvider provider = new DatabaseBackedPagingProvider();
        provider.setDefaultPageSize(defaultPageSize);
        provider.setMaximumPageSize(maxPageSize);
        return provider;
    }

    @Bean
    public IResourceSupportedSvc resourceSupportedSvc(IDaoRegistry registry) {
        return new DaoRegistryResourceSupportedSvc(registry);
    }

    @Bean(name = "myResourceCountsCache")
    public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> systemDao) {
        return ResourceCountCacheUtil.newResourceCountCache(systemDao);
    }

    // ---- the FHIR endpoint ------------------------------------------------------------------

    @Bean
    public RestfulServer restfulServer(
            IFhirSystemDao<?, ?> systemDao,
            ResourceProviderFactory resourceProviders,
            IJpaSystemProvider systemProvider,
            JpaStorageSettings storageSettings,
            ISearchParamRegistry searchParamRegistry,
            IValidationSupport validationSupport,
            DatabaseBackedPagingProvider pagingProvider,
            BulkDataExportProvider bulkDataExportProvider) {
        FhirContext ctx = systemDao.getContext();
        ctx.setNarrativeGenerator(new NullNarrativeGenerator());
        RestfulServer server = new RestfulServer(ctx);
        server.registerProviders(resourceProviders.createProviders());
        server.registerProvider(systemProvider);
        server.registerProvider(bulkDataExportProvider);
        JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
                server, systemDao, storageSettings, searchParamRegistry, validationSupport);
        capabilities.setImplementationDescription("fhirmatch test server (HAPI FHIR JPA, R4)");
        server.setServerConformanceProvider(capabilities);
        server.setDefaultResponseEncoding(EncodingEnum.JSON);
        server.setPagingProvider(pagingProvider);
        server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
        return server;
    }
}
