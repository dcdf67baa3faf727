// Creates the stack's topics and access rules on a fresh cluster, in one JVM (the command-line
// tools take one JVM per topic or per rule). Run by scripts/stack with the broker's classpath:
//
//   java -cp "$KAFKA_LIBS/*" deploy/kafka/Bootstrap.java BOOTSTRAP PARTITIONS ACL_FILE TOPIC...
//
// It connects as the admin principal (ORDERFLOW_KAFKA_ADMIN_PASSWORD in its environment).
// Topics that exist are left as they are; rules are added (adding one twice changes nothing).

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.Properties;
import java.util.concurrent.ExecutionException;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Bootstrap {
    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: Bootstrap BOOTSTRAP PARTITIONS ACL_FILE TOPIC...");
            System.exit(2);
        }
        String password = System.getenv("ORDERFLOW_KAFKA_ADMIN_PASSWORD");
        if (password == null || password.isEmpty()) {
            System.err.println("ORDERFLOW_KAFKA_ADMIN_PASSWORD is not set");
            System.exit(2);
        }
        Properties config = new Properties();
        config.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put("security.protocol", "SASL_PLAINTEXT");
        config.put("sasl.mechanism", "SCRAM-SHA-512");
        config.put("sasl.jaas.config", "org.apache.kafka.common.security.scram.ScramLoginModule required "
                + "username=\"admin\" password=\"" + password + "\";");
        int partitions = Integer.parseInt(args[1]);

        List<NewTopic> topics = new ArrayList<>();
        for (int i = 3; i < args.length; i++) {
            // The broker's default replication factor (3 on three nodes, 1 on one).
            topics.add(new NewTopic(args[i], Optional.of(partitions), Optional.empty()));
        }
        List<AclBinding> rules = new ArrayList<>();
        for (String line : Files.readAllLines(Path.of(args[2]))) {
            String rule = line.strip();
            if (rule.isEmpty() || rule.startsWith("#")) {
                continue;
            }
            String[] field = rule.split("\\s+");
            if (field.length != 4) {
                throw new IllegalArgumentException("not `principal operation resource name`: " + rule);
            }
            rules.add(new AclBinding(
                    new ResourcePattern(ResourceType.valueOf(field[2]), field[3], PatternType.LITERAL),
                    new AccessControlEntry("User:" + field[0], "*", AclOperation.valueOf(field[1]),
                            AclPermissionType.ALLOW)));
        }

        try (Admin admin = Admin.create(config)) {
            for (var created : admin.createTopics(topics).values().entrySet()) {
                try {
                    created.getValue().get();
                    System.out.println("topic " + created.getKey() + " created");
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof TopicExistsException)) {
                        throw e;
                    }
                }
            }
            admin.createAcls(rules).all().get();
            System.out.println(rules.size() + " access rules in place");
        }
    }
}
